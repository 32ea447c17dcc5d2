#!/bin/bash
# read-all.sh DIR: the SHA-256 of every file under DIR, in sha256sum's format with paths
# relative to DIR, between a `BEGIN` line and an `END <files>` line. Any error (a failed
# listing, a failed read) exits non-zero before `END`.
#
# With PAUSE set (seconds), files are read 1 MiB at a time with that pause after each MiB
# and a `PROGRESS <file> <MiB>` line on stderr, so that a read is still in flight when the
# test disturbs the node (each MiB is a new open and read through the mount).
set -euo pipefail
cd "${1:?usage: read-all.sh DIR}"
pause=${PAUSE:-}
# The listing goes to a file first: a failing `find` must fail the script, which it would
# not inside a process substitution.
find . -type f -print0 | sort -z > /tmp/files
echo BEGIN
count=0
while IFS= read -r -d '' f; do
  name=${f#./}
  if [ -z "$pause" ]; then
    sha256sum -- "$name"
  else
    size=$(stat -c %s -- "$name")
    chunks=$(( (size + 1048575) / 1048576 ))
    sum=$(
      for ((i = 0; i < chunks; i++)); do
        dd if="$name" bs=1M skip="$i" count=1 status=none || exit 1
        echo "PROGRESS $name $i" >&2
        sleep "$pause"
      done | sha256sum
    )
    echo "${sum%% *}  $name"
  fi
  count=$((count + 1))
done < /tmp/files
echo "END $count"
