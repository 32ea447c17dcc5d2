#!/bin/bash
# verify-loop.sh DIR SUMS: checks DIR against SUMS (sha256sum's format) again and again,
# in the same process for as long as the pod lives: a listing of DIR (the file count must
# match) and every file opened and read through the mount. Prints `PASS <n>` after each
# good pass; on the first bad one prints `FAIL <n>` and exits 1 (the pod is never
# restarted, so a volume that stops working ends the pod).
set -uo pipefail
dir=${1:?usage: verify-loop.sh DIR SUMS}
sums=${2:?usage: verify-loop.sh DIR SUMS}
cd "$dir" || { echo "FAIL 0 cannot enter $dir"; exit 1; }
want=$(grep -c . "$sums")
pass=0
while true; do
  pass=$((pass + 1))
  have=$(find . -type f | wc -l)
  if [ "$have" != "$want" ]; then
    echo "FAIL $pass listing shows $have files, expected $want"
    exit 1
  fi
  if ! out=$(sha256sum --strict --quiet -c "$sums" 2>&1); then
    echo "FAIL $pass $out" | tr '\n' ' '
    echo
    exit 1
  fi
  echo "PASS $pass"
  sleep "${PAUSE:-2}"
done
