#!/bin/sh
# Records a reply of the default model for an inference scenario, the way the TUI asks:
# plait's system prompt, then the one context file, greedy.
#   tests/data/record-reply.sh FILE "QUESTION" > reply.md
# Run from the directory holding FILE, with a release build of plait.
set -eu
file="$1"
question="$2"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
system="$(cat "$repo/assets/system-prompt.md")

Files in the conversation:

$file
\`\`\`
$(cat "$file")
\`\`\`
"
"$repo/target/release/plait" ask --max-tokens 300 --system "$system" "$question"
