# PostgreSQL for the container-cluster test only (tests/deploy), from the same base image:
# no image is pulled from a registry. Production deployments use a managed or official
# PostgreSQL; this one keeps no data durable (fsync off).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# A fixed uid for the server (Debian's package reuses an existing `postgres` account).
RUN groupadd --gid 10002 postgres && \
    useradd --no-log-init --uid 10002 --gid 10002 --home-dir /var/lib/postgresql postgres && \
    apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postgresql-15 && \
    rm -rf /var/lib/apt/lists/* && \
    install -d -o postgres -g postgres -m 0700 /pgdata
COPY --chmod=0755 postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
USER 10002:10002
ENV PGDATA=/pgdata
EXPOSE 5432
HEALTHCHECK --interval=5s --timeout=3s --retries=5 \
    CMD ["/usr/lib/postgresql/15/bin/pg_isready", "-h", "127.0.0.1", "-q"]
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]
