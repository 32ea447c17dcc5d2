#!/bin/bash
# resume.sh DIR: what a training job does when it starts on a new node: find the latest
# step in its checkpoint volume, load it (here: read every file and print its SHA-256),
# and carry on (write the next step).
#
# Prints `LATEST step-<n>`, the checksums of that step's files between `BEGIN` and
# `END <files>` (paths relative to DIR), then write-steps.sh's output for step n+1.
set -euo pipefail
dir=${1:?usage: resume.sh DIR}
cd "$dir"
# Steps that are only in the lake are listed beside local ones (read-only).
latest=$(find . -mindepth 1 -maxdepth 1 -type d -name 'step-*' -printf '%f\n' \
  | grep -E '^step-[0-9]+$' | sort -t- -k2,2n | tail -n 1 || true)
if [ -z "$latest" ]; then
  echo "no step-<n> directory in $dir" >&2
  exit 1
fi
echo "LATEST $latest"
find "$latest" -type f -print0 | sort -z > /tmp/files
echo BEGIN
count=0
while IFS= read -r -d '' f; do
  sha256sum -- "$f"
  count=$((count + 1))
done < /tmp/files
echo "END $count"
next=$(( ${latest#step-} + 1 ))
exec bash "$(dirname "$0")/write-steps.sh" "$dir" "$next"
