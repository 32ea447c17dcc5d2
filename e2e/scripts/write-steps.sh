#!/bin/bash
# write-steps.sh DIR STEP...: writes each checkpoint step the way PyTorch DCP does: a
# directory `step-<n>/` with two shard files, then the `.metadata` marker last (the
# CheckpointSync's default commit rule). Prints `COMMITTED step-<n>` after each marker,
# then the SHA-256 of every file written (sha256sum's format, paths relative to DIR),
# computed from the bytes as they were written (tee), not read back, between `BEGIN` and
# `END <files>`.
#
# Used twice: by the first job (steps 1 2 3) and, after a resume, to write the next step.
set -euo pipefail
cd "${1:?usage: write-steps.sh DIR STEP...}"
shift
: > /tmp/written
for step in "$@"; do
  d="step-$step"
  mkdir "$d"
  # Sizes differ per step and are not multiples of the 4 MiB block, so a step that came
  # back from the wrong place or truncated shows.
  for shard in 0 1; do
    size=$(( (3 - 2 * shard) * 1048576 + 4097 * step + shard ))
    sum=$(head -c "$size" /dev/urandom | tee "$d/shard-$shard.bin" | sha256sum)
    echo "${sum%% *}  $d/shard-$shard.bin" >> /tmp/written
  done
  marker=$(printf '{"step": %d, "shards": 2}\n' "$step")
  sum=$(printf '%s' "$marker" | tee "$d/.metadata" | sha256sum)
  echo "${sum%% *}  $d/.metadata" >> /tmp/written
  echo "COMMITTED $d"
done
echo BEGIN
cat /tmp/written
echo "END $(wc -l < /tmp/written)"
