# The single shardpool image: every role is a subcommand of one binary
# (`shardpool operator|shard|router|crd`); the chart passes the role as args.
# Not built on the development machines (no container runtime); kept correct
# by reading and by `cargo build --release --locked`, which it runs.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that source changes reuse the dependency layer.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin shardpool

# glibc only (TLS is rustls): distroless cc, non-root user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/shardpool /shardpool
USER 65532:65532
ENTRYPOINT ["/shardpool"]
