# Multi-stage build: compile in the Rust image, run from a slim Debian with only the binary.
FROM rust:1-bookworm AS build
# plotters (the benchmark's histogram) links fontconfig.
RUN apt-get update && apt-get install -y --no-install-recommends libfontconfig1-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked && rm -rf src
COPY src ./src
COPY clients ./clients
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libfontconfig1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/syncbridge --create-home syncbridge
COPY --from=build /src/target/release/syncbridge /usr/local/bin/syncbridge
USER syncbridge
WORKDIR /var/lib/syncbridge
ENV SYNCBRIDGE_DATA_DIR=/var/lib/syncbridge
VOLUME /var/lib/syncbridge
EXPOSE 5000
ENTRYPOINT ["syncbridge"]
CMD ["run"]
