#!/usr/bin/env bash
# check_exports.sh — checks that a built libkfac.so matches include/kfac.h:
#   1. every kfac_* function the header declares carries KFAC_API (a declaration without it would
#      not be exported on every platform);
#   2. every function declared in the header is exported (defined, dynamic symbol table),
#      including those of the experimental section (#if defined(KFAC_EXPERIMENTAL_API)): the
#      macro only makes callers opt in, the library exports them all the same;
#   3. the library exports no other kfac_* symbol;
#   4. its SONAME is libkfac.so.0.<MINOR> while KFAC_VERSION_MAJOR is 0, else libkfac.so.<MAJOR>.
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

# The header's code: comments removed (they contain example calls such as
# "kfac_optimizer_step_f32(opt, ...)" that are not declarations).
code=$(perl -0777 -pe 's{/\*.*?\*/}{ }gs; s{//[^\n]*}{}g' "$header")

# Every identifier kfac_... followed by "(" in the code: the declared functions (the header has
# no function-like kfac_ macros and no calls outside comments).
declared=$(grep -oE '\bkfac_[a-z0-9_]+[[:space:]]*\(' <<<"$code" | sed -E 's/[[:space:]]*\($//' |
    sort -u)

# The declarations that carry KFAC_API: "KFAC_API <return type> kfac_name(", possibly across
# lines (declarations are separated by ";", so the return type holds no ";", "{" or "}").
with_api=$(perl -0777 -ne 'while (/\bKFAC_API\b[^;{}()]*?\b(kfac_[a-z0-9_]+)\s*\(/g) { print "$1\n" }' \
    <<<"$code" | sort -u)

# The experimental section: the declarations between "#if defined(KFAC_EXPERIMENTAL_API)" (or
# "#ifdef KFAC_EXPERIMENTAL_API") and its "#endif" (the section holds no nested #if).
experimental=$(perl -0777 -ne '
    while (/^[ \t]*#[ \t]*if(?:[ \t]+defined[ \t]*\(?[ \t]*|def[ \t]+)KFAC_EXPERIMENTAL_API\b.*?$(.*?)^[ \t]*#[ \t]*endif/gms) {
        my $block = $1;
        while ($block =~ /\b(kfac_[a-z0-9_]+)\s*\(/g) { print "$1\n" }
    }' <<<"$code" | sort -u)

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

no_api=$(comm -23 <(echo "$declared") <(echo "$with_api"))
if [[ -n $no_api ]]; then
    echo "FAIL: declared in $(basename "$header") without KFAC_API:"
    sed 's/^/    /' <<<"$no_api"
    status=1
else
    echo "ok   every kfac_* declaration in $(basename "$header") carries KFAC_API"
fi
n_experimental=$(grep -c . <<<"$experimental" || true)
if [[ $n_experimental -eq 0 ]]; then
    echo "note no experimental section (#if defined(KFAC_EXPERIMENTAL_API)) declarations found"
fi

missing=$(comm -23 <(echo "$declared") <(echo "$exported_functions"))
if [[ -n $missing ]]; then
    echo "FAIL: declared in $(basename "$header") but not exported as functions by $lib:"
    while read -r name; do
        if grep -qx -- "$name" <<<"$experimental"; then echo "    $name (experimental)"
        else echo "    $name"; fi
    done <<<"$missing"
    status=1
else
    echo "ok   all $n_declared functions declared in $(basename "$header") are exported" \
         "($((n_declared - n_experimental)) stable, $n_experimental experimental)"
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
