#!/usr/bin/env bash
# One command on a fresh machine: install, build the minimal image, boot a VM from a spec,
# show it ready (with its boot time), talk to its agent, tear it down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export VMFORGE_HOME="${VMFORGE_HOME:-$PWD/.vmforge-demo}"
vf=.venv/bin/vmforge
name="demo-$$"
cleanup() { "$vf" rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
"$vf" doctor || true
"$vf" image build minimal
"$vf" run -f examples/minimal.yaml --name "$name"
"$vf" ls
"$vf" exec "$name" -- uname -a
"$vf" health "$name"
"$vf" stop "$name"
"$vf" rm "$name"
echo "done: the VM booted, answered through its agent, and was removed"
