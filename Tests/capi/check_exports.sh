#!/usr/bin/env bash
# check_exports.sh — checks that a built libkfac.so matches include/kfac.h:
#   1. every function declared in the header is exported (defined, dynamic symbol table);
#   2. the library exports no other kfac_* symbol;
#   3. its SONAME is libkfac.so.0.<MINOR> while KFAC_VERSION_MAJOR is 0, else libkfac.so.<MAJOR>.
#
# Usage: Tests/capi/check_exports.sh path/to/libkfac.so [path/to/kfac.h]
#        (the header defaults to include/kfac.h of this repository)
# Exit status 0 if all checks pass, 1 otherwise (listing what is wrong), 2 on usage errors.
set -euo pipefail

lib=${1:-}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
header=${2:-$here/../../include/kfac.h}

if [[ -z $lib ]]; then
    echo "usage: $0 path/to/libkfac.so [path/to/kfac.h]" >&2
    exit 2
fi
for f in "$lib" "$header"; do
    if [[ ! -r $f ]]; then
        echo "error: cannot read $f" >&2
        exit 2
    fi
done

# Declarations: the header with its comments removed (the comments contain example calls such
# as "kfac_step_f32(opt, ...)" that are not declarations), then every identifier kfac_... that
# is followed by "(".
declared=$(perl -0777 -pe 's{/\*.*?\*/}{ }gs; s{//[^\n]*}{}g' "$header" |
    grep -oE '\bkfac_[a-z0-9_]+[[:space:]]*\(' | sed -E 's/[[:space:]]*\($//' | sort -u)

# Exports: defined dynamic symbols whose name starts with kfac_ (version suffixes "@..."
# removed). Functions must be of type T (or i, an indirect function); any other kfac_ symbol
# (data, weak, ...) counts as an undeclared export.
nm_out=$(nm -D --defined-only "$lib")
exported_functions=$(awk '$2 ~ /^[Ti]$/ { sub(/@.*/, "", $3); print $3 }' <<<"$nm_out" |
    grep -E '^kfac_' | sort -u || true)
exported_all=$(awk 'NF >= 3 { sub(/@.*/, "", $3); print $3 }' <<<"$nm_out" |
    grep -E '^kfac_' | sort -u || true)

status=0
n_declared=$(grep -c . <<<"$declared" || true)
if [[ $n_declared -eq 0 ]]; then
    echo "FAIL: found no kfac_* declarations in $header"
    exit 1
fi

missing=$(comm -23 <(echo "$declared") <(echo "$exported_functions"))
if [[ -n $missing ]]; then
    echo "FAIL: declared in $(basename "$header") but not exported as functions by $lib:"
    sed 's/^/    /' <<<"$missing"
    status=1
else
    echo "ok   all $n_declared functions declared in $(basename "$header") are exported"
fi

extra=$(comm -13 <(echo "$declared") <(echo "$exported_all"))
if [[ -n $extra ]]; then
    echo "FAIL: exported by $lib with the kfac_ prefix but not declared in the header:"
    sed 's/^/    /' <<<"$extra"
    status=1
else
    echo "ok   no kfac_* symbol is exported beyond the header's declarations"
fi

major=$(sed -nE 's/^#define[[:space:]]+KFAC_VERSION_MAJOR[[:space:]]+([0-9]+).*/\1/p' "$header")
minor=$(sed -nE 's/^#define[[:space:]]+KFAC_VERSION_MINOR[[:space:]]+([0-9]+).*/\1/p' "$header")
if [[ ${major:-0} == 0 ]]; then want_soname="libkfac.so.0.${minor:-0}"; else want_soname="libkfac.so.$major"; fi
soname=$(readelf -d "$lib" | sed -nE 's/.*\(SONAME\).*\[(.*)\].*/\1/p')
if [[ $soname != "$want_soname" ]]; then
    echo "FAIL: SONAME is '${soname:-(none)}', expected '$want_soname'"
    status=1
else
    echo "ok   SONAME is $soname"
fi

exit $status
