#!/usr/bin/env bash
# The one-command GPU check (issue 14); what it measures: bench/device_check.py's docstring.
#
#   bench/device_check.sh                    # on the GPU machine: installs .whl/*.whl, runs the 4 jobs (< 8 min)
#   bench/device_check.sh --dry-run          # here, on the CPU: the same code path at tiny sizes (~30 s)
#   bench/device_check.sh --print-wheels     # the pip download command for .whl/ (pinned to .venv's versions)
#   bench/device_check.sh --download-wheels  # run it here, online, before the GPU session (~16 MB)
#
# On the GPU machine (no network) the wheels in .whl/ (carried with the working tree) are installed
# with --no-index --no-deps into /tmp/depthtune-site, which goes first on PYTHONPATH: the machine's
# own torch stays, our transformers/peft/... shadow its older ones. Results: bench/results/ and $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then :
elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
else PYTHON=python3
fi
export PYTHONUNBUFFERED=1

case " $* " in
  *" --dry-run "*|*" --print-wheels "*|*" --download-wheels "*|*" -h "*|*" --help "*) ;;
  *)
    if compgen -G ".whl/*.whl" >/dev/null; then
      SITE=/tmp/depthtune-site
      echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
      export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
      echo "no .whl/*.whl: using this Python's packages as they are (bench/device_check.sh --download-wheels first)"
      export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    ;;
esac
exec "$PYTHON" -m bench.device_check "$@"
