#!/bin/sh
# Entry point of the dykaf-lab image (API, migration step and workers share it).
#
#   docker run IMAGE                         -> the CMD: dykaf-lab api --host 0.0.0.0 --port 8000
#   docker run IMAGE worker --queue gpu --gpu 0
#   docker run IMAGE migrate                 -> a dykaf-lab subcommand is prefixed with dykaf-lab
#   docker run IMAGE python -m bench.gpu_check --help   -> anything else runs as given
#
# Before handing over it makes sure the state directories exist and are writable by this user, so
# a wrongly owned shared mount (NFS export, host directory) fails loudly at start instead of at the
# first checkpoint of the first run.
set -eu

data_dir="${DYKAF_DATA_DIR:-/data}"
cache_dir="${DYKAF_CACHE_DIR:-/cache/dykaf-lab}"

for dir in "$data_dir" "$data_dir/checkpoints" "$cache_dir"; do
    mkdir -p "$dir" 2>/dev/null || true
done

case "${1:-}" in
    api|worker|migrate|keys|submit|status|watch|cancel|download|run|up)
        set -- dykaf-lab "$@"
        ;;
esac

# Only the processes that write state need the data directory to be writable.
if [ "${1:-}" = "dykaf-lab" ] && { [ "${2:-}" = "worker" ] || [ "${2:-}" = "api" ]; }; then
    probe="$data_dir/checkpoints/.write-test-$$"
    if ! ( : > "$probe" ) 2>/dev/null; then
        echo "entrypoint: $data_dir/checkpoints is not writable by uid $(id -u) gid $(id -g);" \
             "fix the owner of the shared directory or rebuild the image with --build-arg UID=/GID=" >&2
        exit 1
    fi
    rm -f "$probe"
fi

exec "$@"
