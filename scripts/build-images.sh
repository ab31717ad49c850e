#!/usr/bin/env bash
# Build CSML's container images with Podman, from a local wheelhouse. Idempotent: what is
# already there (packages, settings, base image, wheels, image layers) is reused.
#
#   bash scripts/build-images.sh                 # everything (make images)
#   bash scripts/build-images.sh --wheelhouse    # only the wheelhouse (make wheelhouse)
#
# 1. podman, runc, debootstrap (apt-get, as root) and the containers.conf settings this
#    kind of machine needs (no ulimit overrides, cgroupfs), only when missing.
# 2. Base image localhost/debian-base:bookworm: debootstrap minbase + python3 + venv, made
#    once; its tarball is cached in ~/.cache/csml/images. CSML_BASE_IMAGE=python:3.11-slim
#    (or any Debian-based image with Python 3.11) skips this where a registry is reachable.
# 3. Wheelhouse ~/.cache/csml/wheelhouse: csml's wheel plus every dependency of every extra,
#    and the DyNet wheel of .ci/build-dynet-wheel.sh. The dependencies are fetched again
#    only when pyproject's dependency lists change; csml's wheel when its source changes.
# 4. Images (tag localhost/<name>:dev), from deploy/images/Dockerfile:
#    csml-coordinator, csml-worker-{echo,opencv,dlib,dynet}, csml-client, and the test-only
#    csml-test-postgres (deploy/images/postgres.Dockerfile).
#
# Environment: PYTHON (builds the wheels; default python3), CSML_CACHE_DIR (~/.cache/csml),
# CSML_BASE_IMAGE, CSML_IMAGE_TAG (dev), CSML_IMAGES (names to build; default all).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

PY="${PYTHON:-python3}"
CACHE="${CSML_CACHE_DIR:-${HOME:?HOME is not set}/.cache/csml}"
WHEELHOUSE="$CACHE/wheelhouse"
BASE_TAR="$CACHE/images/debian-base-bookworm.tar"
BASE_IMAGE="${CSML_BASE_IMAGE:-localhost/debian-base:bookworm}"
TAG="${CSML_IMAGE_TAG:-dev}"
DEBIAN_MIRROR="${CSML_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ALL_IMAGES="csml-coordinator csml-worker-echo csml-worker-opencv csml-worker-dlib csml-worker-dynet csml-client csml-test-postgres"
IMAGES="${CSML_IMAGES:-$ALL_IMAGES}"
WHEELHOUSE_ONLY=0
[[ "${1:-}" == "--wheelhouse" ]] && WHEELHOUSE_ONLY=1

log() { printf '[build-images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
pm() { podman --runtime runc "$@"; }
START=$SECONDS

# ---------------------------------------------------------------- 1. tools and settings
# Podman's network backend comes only as a recommend: netavark resolves container names
# through aardvark-dns. Without them Debian's Podman 4.3 falls back to CNI with no DNS
# plugin and containers cannot reach each other by name (tests/e2e/containers needs that).
# netavark sets up NAT with iptables, which nothing depends on ("netavark: No such file
# or directory" at `podman run` without it).
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
[[ -x /usr/lib/podman/netavark ]] || need+=(netavark)
[[ -x /usr/lib/podman/aardvark-dns ]] || need+=(aardvark-dns)
[[ -x /usr/sbin/iptables ]] || need+=(iptables)
[[ "$BASE_IMAGE" != localhost/debian-base:* ]] || command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]} && !WHEELHOUSE_ONLY)); then
    ((EUID == 0)) || die "missing ${need[*]}: sudo apt-get install ${need[*]}"
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

conf_set() {  # conf_set SECTION KEY VALUE: add `KEY = VALUE` under [SECTION] unless KEY is set
    local conf=/etc/containers/containers.conf section="$1" key="$2" value="$3"
    mkdir -p /etc/containers
    touch "$conf"
    grep -Eq "^[[:space:]]*${key}[[:space:]]*=" "$conf" && return 0
    log "containers.conf: [$section] $key = $value"
    if grep -q "^\[$section\]" "$conf"; then
        sed -i "/^\[$section\]/a $key = $value" "$conf"
    else
        printf '\n[%s]\n%s = %s\n' "$section" "$key" "$value" >>"$conf"
    fi
}
if ((!WHEELHOUSE_ONLY && EUID == 0)); then
    conf_set containers default_ulimits '[]'
    conf_set engine cgroup_manager '"cgroupfs"'
    conf_set network network_backend '"netavark"'
fi

# ---------------------------------------------------------------- 2. base image
if ((!WHEELHOUSE_ONLY)) && [[ "$BASE_IMAGE" == localhost/debian-base:* ]] &&
    ! pm image exists "$BASE_IMAGE"; then
    if [[ ! -s "$BASE_TAR" ]]; then
        mkdir -p "$(dirname "$BASE_TAR")"
        rootfs="$(mktemp -d "${TMPDIR:-/tmp}/csml-rootfs.XXXXXX")"
        trap 'rm -rf -- "$rootfs"' EXIT
        log "debootstrap bookworm (minbase + python3, python3-venv) into $rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 ||
            { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed"; }
        rm -f "$rootfs.log"
        rm -rf "${rootfs:?}"/var/cache/apt/archives/*.deb "${rootfs:?}"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$BASE_TAR.tmp" . && mv -f "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf -- "$rootfs"
        trap - EXIT
    fi
    log "podman import $BASE_TAR as $BASE_IMAGE"
    pm import --quiet "$BASE_TAR" "$BASE_IMAGE" >/dev/null
fi

# ---------------------------------------------------------------- 2b. name resolution
# Prove that one container resolves another by name on a user network before building
# anything: the container tests depend on it, and without it they fail much later.
if ((!WHEELHOUSE_ONLY)); then
    backend="$(pm info --format '{{.Host.NetworkBackend}}' 2>/dev/null || true)"
    [[ "$backend" == netavark ]] ||
        die "podman uses the '$backend' network backend, not netavark: container names will not resolve (apt-get install netavark aardvark-dns; set network_backend = \"netavark\" in /etc/containers/containers.conf; podman system reset)"
    net="csml-dns-check-$$"
    cleanup_dns_check() {
        pm rm -f -t 0 "$net-a" >/dev/null 2>&1 || true
        pm network rm -f "$net" >/dev/null 2>&1 || true
    }
    cleanup_dns_check
    pm network create "$net" >/dev/null || die "podman network create failed"
    pm run -d --name "$net-a" --network "$net" "$BASE_IMAGE" sleep 60 >/dev/null ||
        { cleanup_dns_check; die "podman run on a user network failed"; }
    if ! pm run --rm --network "$net" "$BASE_IMAGE" getent hosts "$net-a" >/dev/null; then
        cleanup_dns_check
        die "containers on a podman network cannot resolve each other's names (is aardvark-dns installed? podman info: backend $backend)"
    fi
    cleanup_dns_check
    log "podman network DNS works (backend $backend)"
fi

# ---------------------------------------------------------------- 3. wheelhouse
mkdir -p "$WHEELHOUSE"
exec 9>"$WHEELHOUSE/.lock"
flock 9  # one builder at a time (two shells, CI and a test)
hashes="$("$PY" - "$ROOT" <<'PY'
import hashlib, json, sys, tomllib
from pathlib import Path

root = Path(sys.argv[1])
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]
deps = json.dumps([project["dependencies"], sys.version_info[:2]] + [extras.get(e) for e in
                  ("server", "postgresql", "opencv", "dlib", "dynet")], sort_keys=True)
src = hashlib.sha256()
for path in sorted((root / "src").rglob("*")):
    if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
        src.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
src.update((root / "pyproject.toml").read_bytes())
files = hashlib.sha256()
for path in sorted((root / "deploy" / "images").iterdir()):
    if path.is_file():
        files.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
print(hashlib.sha256(deps.encode()).hexdigest()[:16], src.hexdigest()[:16],
      files.hexdigest()[:16])
PY
)"
read -r DEPS_HASH SRC_HASH FILES_HASH <<<"$hashes"

if [[ "$(cat "$WHEELHOUSE/.csml-hash" 2>/dev/null)" != "$SRC_HASH" ]] ||
    ! compgen -G "$WHEELHOUSE/csml-*.whl" >/dev/null; then
    log "building csml's wheel (source $SRC_HASH)"
    tmp="$(mktemp -d)"
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" "$ROOT" >"$tmp.log" 2>&1 ||
        { tail -n 30 "$tmp.log" >&2; die "pip wheel of csml failed (needs setuptools, wheel in $PY)"; }
    rm -f "$tmp.log"
    rm -f "$WHEELHOUSE"/csml-*.whl
    mv "$tmp"/csml-*.whl "$WHEELHOUSE/"
    rm -rf -- "$tmp" "$ROOT/build" "$ROOT"/src/*.egg-info
    echo "$SRC_HASH" >"$WHEELHOUSE/.csml-hash"
fi
# What the images are keyed on: the wheel's contents (its zip timestamps vary per build).
CSML_HASH="$("$PY" - "$WHEELHOUSE" <<'PY'
import hashlib, sys, zipfile
from pathlib import Path

digest = hashlib.sha256()
for wheel in sorted(Path(sys.argv[1]).glob("csml-*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            digest.update(name.encode() + b"\0" + z.read(name) + b"\0")
print(digest.hexdigest()[:16])
PY
)"

if [[ "$(cat "$WHEELHOUSE/.deps-hash" 2>/dev/null)" != "$DEPS_HASH" ]]; then
    dynet_whl="$(PYTHON="$PY" bash .ci/build-dynet-wheel.sh | tail -n 1)"
    [[ -f "$dynet_whl" ]] || die "no DyNet wheel from .ci/build-dynet-wheel.sh"
    log "collecting the dependency wheels (dependency lists $DEPS_HASH)"
    cp -f "$dynet_whl" "$WHEELHOUSE/"
    csml_whl="$(compgen -G "$WHEELHOUSE/csml-*.whl" | head -n 1)"
    "$PY" -m pip wheel -q -w "$WHEELHOUSE" --find-links "$WHEELHOUSE" --only-binary dynet \
        "csml[server,postgresql,opencv,dlib,dynet] @ file://$csml_whl" >"$WHEELHOUSE/.pip.log" 2>&1 ||
        { tail -n 30 "$WHEELHOUSE/.pip.log" >&2; die "pip wheel of the dependencies failed"; }
    echo "$DEPS_HASH" >"$WHEELHOUSE/.deps-hash"
fi
flock -u 9
log "wheelhouse $WHEELHOUSE: $(compgen -G "$WHEELHOUSE/*.whl" | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
((WHEELHOUSE_ONLY)) && exit 0

# ---------------------------------------------------------------- 4. images
# An image whose label shows it was built from the same inputs is left as it is.
up_to_date() {  # up_to_date NAME KEY
    local have
    have="$(pm image inspect --format '{{index .Labels "org.csml.build-key"}}' \
        "localhost/$1:$TAG" 2>/dev/null || true)"
    [[ "$have" == "$2" ]]
}
build() {  # build NAME TARGET APP APP_EXTRA
    local name="$1" target="$2" app="$3" extra="$4" t0=$SECONDS
    local key="$BASE_IMAGE $FILES_HASH $DEPS_HASH $CSML_HASH"
    if up_to_date "$name" "$key"; then log "localhost/$name:$TAG is up to date"; return 0; fi
    old_ids+=("$(pm image inspect --format '{{.Id}}' "localhost/$name:$TAG" 2>/dev/null || true)")
    pm build --quiet --format docker --pull=never --network host --layers \
        -f deploy/images/Dockerfile --target "$target" --build-context "wheels=$WHEELHOUSE" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "APP=$app" \
        --build-arg "APP_EXTRA=$extra" --build-arg "DEPS_HASH=$DEPS_HASH" \
        --build-arg "CSML_HASH=$CSML_HASH" --label "org.csml.build-key=$key" \
        -t "localhost/$name:$TAG" deploy/images >/dev/null || die "podman build of $name failed"
    log "built localhost/$name:$TAG in $((SECONDS - t0)) s"
}
build_postgres() {
    local name=csml-test-postgres t0=$SECONDS key="$BASE_IMAGE $FILES_HASH"
    if up_to_date "$name" "$key"; then log "localhost/$name:$TAG is up to date"; return 0; fi
    old_ids+=("$(pm image inspect --format '{{.Id}}' "localhost/$name:$TAG" 2>/dev/null || true)")
    pm build --quiet --format docker --pull=never --network host --layers \
        -f deploy/images/postgres.Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --label "org.csml.build-key=$key" -t "localhost/$name:$TAG" deploy/images >/dev/null ||
        die "podman build of $name failed"
    log "built localhost/$name:$TAG in $((SECONDS - t0)) s"
}
old_ids=()  # images these builds replace: removed at the end (unless still in use)
for name in $IMAGES; do
    case "$name" in
        csml-coordinator) build "$name" coordinator "" "server,postgresql" ;;
        csml-worker-echo) build "$name" worker echo "" ;;
        csml-worker-*) build "$name" worker "${name#csml-worker-}" "${name#csml-worker-}" ;;
        csml-client) build "$name" client "" "" ;;
        csml-test-postgres) build_postgres ;;
        *) die "unknown image $name (known: $ALL_IMAGES)" ;;
    esac
done
for id in "${old_ids[@]}"; do
    [[ -n "$id" ]] && { pm rmi "$id" >/dev/null 2>&1 || true; }
done
log "done in $((SECONDS - START)) s"
