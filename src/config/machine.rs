//! What the machine says: CPU counts for `--concurrency`, the host name
//! for `-n`.

/// Celery's default concurrency: the machine's online CPUs, what
/// `os.cpu_count()` returns (billiard's `cpu_count`), whatever the
/// container's CPU limit or the process's CPU affinity; 2 when unknown, as
/// Celery. `std::thread::available_parallelism` is not used: it applies the
/// cgroup quota and the affinity mask, which Celery's default does not.
pub fn default_concurrency() -> usize {
    use nix::unistd::{sysconf, SysconfVar};
    sysconf(SysconfVar::_NPROCESSORS_ONLN)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n > 0)
        .unwrap_or(2)
}

/// Celery 5.7's `-c auto`: the CPUs this process may run on, capped by the
/// cgroup's CPU quota (`cpu.max`) rounded up, at least 1.
pub fn auto_concurrency() -> usize {
    let available = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&i| set.is_set(i).unwrap_or(false))
                .count()
        })
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or_else(default_concurrency);
    let quota = std::fs::read_to_string("/sys/fs/cgroup/cpu.max")
        .ok()
        .and_then(|text| cpu_quota(&text));
    quota.map_or(available, |q| q.clamp(1, available))
}

/// cgroup v2 `cpu.max` as whole CPUs, rounded up (`"150000 100000"` → 2;
/// `"max 100000"` → no quota).
pub fn cpu_quota(text: &str) -> Option<usize> {
    let mut parts = text.split_whitespace();
    let quota: u64 = parts.next()?.parse().ok()?;
    let period: u64 = parts.next()?.parse().ok().filter(|p| *p > 0)?;
    Some(quota.div_ceil(period).max(1) as usize)
}

pub(super) fn local_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Expands Celery's `%h`, `%n`, `%d` and `%%` in a node name, adding
/// `celery@` when no `@` is given.
pub fn expand_hostname(template: &str, host: &str) -> Result<String, String> {
    let (name, domain) = host.split_once('.').unwrap_or((host, ""));
    let mut out = String::new();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('n') => out.push_str(name),
            Some('d') => out.push_str(domain),
            Some('%') => out.push('%'),
            Some(other) => return Err(format!("unknown placeholder %{other} in {template:?}")),
            None => return Err(format!("dangling % in {template:?}")),
        }
    }
    if out.trim().is_empty() {
        return Err("node name is empty".into());
    }
    if !out.contains('@') {
        out = format!("celery@{out}");
    }
    Ok(out)
}
