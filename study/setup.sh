#!/usr/bin/env bash
# The project's one installer: `make install` runs it on a laptop or CI (dev extras), cluster.yaml's
# setup_commands run it on every cluster node (cluster extras: the autoscaler's boto3, ray[default]).
#
#   study/setup.sh [--extras dev|cluster|dev,cluster] [--assets] [--install-python] [--venv DIR] [--python EXE]
#
# It finds a Python >= 3.11 (the Ubuntu 22.04 deep-learning AMIs' python3 is 3.10; --install-python
# installs python3.11 from the distribution when none is there), makes the virtual environment, installs
# torch first at the version pinned in pyproject.toml (a looser requirement pulls a multi-GB build), then
# the project (editable) with its extras; --assets fetches the offline assets. Idempotent: nothing is
# reinstalled while pyproject.toml and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=dev venv=.venv python="" assets=0 install_python=0
while (($#)); do
  case "$1" in
    --extras) extras="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --assets) assets=1; shift ;;
    --install-python) install_python=1; shift ;;
    *) echo "error: unknown option $1 (valid: --extras, --venv, --python, --assets, --install-python)" >&2; exit 2 ;;
  esac
done

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

find_python() {
  local c
  for c in ${python:-python3.13 python3.12 python3.11 python3}; do
    if command -v "$c" >/dev/null 2>&1 && new_enough "$c"; then command -v "$c"; return 0; fi
  done
  return 1
}

if ! py=$(find_python); then
  if ((install_python)) && [[ -z "$python" ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing python3.11 (this machine has no Python >= 3.11)"
    # on a node's first boot unattended-upgrades holds the dpkg lock for minutes: wait for it, not fail
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
      python3.11 python3.11-venv python3.11-dev >/dev/null
  fi
  if ! py=$(find_python); then
    echo "error: petl-study needs Python >= 3.11; found ${python:-$(python3 --version 2>&1 || echo no python3)}" \
         "(pass --python EXE, or --install-python on Debian/Ubuntu)" >&2
    exit 2
  fi
fi

stamp="$venv/.installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) extras=$extras"
if [[ -x "$venv/bin/python" ]] && new_enough "$venv/bin/python" && [[ "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then
  echo "$venv is up to date ($("$venv/bin/python" --version))"
else
  if ! { [[ -x "$venv/bin/python" ]] && new_enough "$venv/bin/python"; }; then
    rm -rf "$venv"
    "$py" -m venv "$venv"
  fi
  pip=("$venv/bin/python" -m pip install -q)
  "${pip[@]}" --upgrade pip
  torch=$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
  "${pip[@]}" "$torch"
  "${pip[@]}" -e ".[$extras]"
  echo "$want" > "$stamp"
  echo "installed petl-study[$extras] into $venv ($("$venv/bin/python" --version))"
fi

# dev: the report test opens report.html in a real headless browser, Debian's chromium (the test fails,
# saying so, without one; CHROMIUM=/path/to/chrome names another). Nothing is tried where there is no apt-get.
if [[ ",$extras," == *",dev,"* ]] && ! command -v "${CHROMIUM:-chromium}" >/dev/null 2>&1 \
   && command -v apt-get >/dev/null 2>&1; then
  as_root=(env DEBIAN_FRONTEND=noninteractive)
  ((EUID == 0)) || as_root=(sudo "${as_root[@]}")
  echo "installing chromium (headless browser for the report test)"
  if ! { "${as_root[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq \
         && "${as_root[@]}" apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium \
            >/dev/null; }; then
    echo "warning: could not install chromium; tests/integration/test_analysis.py's browser check will fail" >&2
  fi
fi

if ((assets)); then
  "$venv/bin/python" -m study.assets fetch
fi
