//! Liveness probe: exits 0 while the celeriac supervisor and its task
//! processes are alive, whatever the broker does; 1 otherwise.

#![forbid(unsafe_code)]

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (line, code) = celeriac_probes::run(celeriac_probes::Probe::Liveness, &args, |k| {
        std::env::var(k).ok().filter(|v| !v.is_empty())
    });
    println!("{line}");
    std::process::exit(code)
}
