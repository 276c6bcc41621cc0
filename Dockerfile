# syntax=docker/dockerfile:1
#
# celeriac worker image.
#   build:   docker build -t <registry>/celeriac:<tag> .
#   runtime: distroless cc (glibc, libgcc, CA certificates; no shell, no package manager),
#            uid/gid 1000, exec-form ENTRYPOINT so the worker is PID 1 and receives SIGTERM itself.
# The builder and runtime images must share a Debian release (glibc ABI). Pin both by digest in CI.
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12

FROM ${RUST_IMAGE} AS build
# TLS is rustls + ring (no OpenSSL); ring's C/asm parts build with the gcc the image ships.
WORKDIR /build
COPY . .
# The image gets stripped binaries (the worker: about 6 MB instead of 40 MB): no debug info, no
# symbol table. A local `cargo build --release` keeps `debug = 1` for profiling.
# The probes use the `probes` profile (also panic=abort: a smaller peak RSS per kubelet exec).
RUN cargo build --release --locked --config profile.release.debug=false --config profile.release.strip=true -p celeriac \
    && cargo build --profile probes --locked -p celeriac-probes \
    && mkdir -p /out/state \
    && cp target/release/celeriac target/probes/worker-readiness target/probes/worker-liveness /out/

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/celeriac /usr/local/bin/celeriac
COPY --from=build /out/worker-readiness /usr/local/bin/worker-readiness
COPY --from=build /out/worker-liveness /usr/local/bin/worker-liveness
# State dir for the probe file. Kubernetes mounts an emptyDir here (read-only root filesystem);
# the pre-created directory keeps a plain `docker run` working too.
COPY --from=build --chown=1000:1000 /out/state /var/run/celeriac
ENV CELERIAC_STATE_DIR=/var/run/celeriac
USER 1000:1000
EXPOSE 9808
ENTRYPOINT ["/usr/local/bin/celeriac"]
CMD ["worker"]
