#!/usr/bin/env bash
# kfac.hpp mirrors kfac.h one to one: every function the header declares with KFAC_API (the
# experimental section's too) must be called by the wrapper. Lists the ones that are not.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
declared="$(tr '\n' ' ' < "$root/include/kfac.h" | grep -o 'KFAC_API [^;(]*(' | grep -o 'kfac_[a-z0-9_]*($' | tr -d '(' | sort -u)"
missing=""
for name in $declared; do
    grep -q "\b$name(" "$root/include/kfac.hpp" || missing="$missing $name"
done
if [ -n "$missing" ]; then
    echo "include/kfac.hpp does not wrap:$missing" >&2
    exit 1
fi
echo "kfac.hpp wraps all $(echo "$declared" | wc -w) functions of kfac.h"
