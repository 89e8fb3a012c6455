#!/usr/bin/env bash
# The root filesystem of an image: one binary and exactly the shared libraries it links
# (found with ldd: its whole dependency closure, and the dynamic loader), nothing else —
# no shell, no package manager, no /etc. Both ways of building the images use it: the
# build stage of deploy/images/*.Dockerfile, and scripts/build-images.sh here; the
# Dockerfile's runtime stage (FROM scratch) copies the result to /.
#
#   deploy/images/rootfs.sh proxy   BINARY DEST   # tessera-proxy, plus iptables for `init`
#   deploy/images/rootfs.sh tessera BINARY DEST   # the control plane and CLI
#
# The proxy image also serves the injected `tessera-init` container, and
# `tessera-proxy init` runs iptables-restore/iptables-save/iptables (proxy/src/capture.rs).
# So it carries iptables' nf_tables multi-call binary with the names it answers to, and
# the four extensions the capture rules load (dlopen, which ldd cannot see): tcp, owner,
# REDIRECT and standard. tests/tests/e2e/images.rs runs `init` in the image, so a
# missing one fails there.
#
# Files keep the paths they have on the build machine (Debian bookworm, in both cases),
# so the loader finds the libraries in its default directories without an ld.so.cache.
set -euo pipefail
# Directories the non-root users of the images can traverse, whatever the caller's umask.
umask 022

usage() {
    echo "usage: $0 proxy|tessera BINARY DEST" >&2
    exit 2
}
[ "$#" -eq 3 ] || usage
kind=$1 binary=$2 dest=$3
case "$kind" in
proxy) name=tessera-proxy ;;
tessera) name=tessera ;;
*) usage ;;
esac
[ -x "$binary" ] || { echo "$binary: not an executable" >&2; exit 1; }
if [ -e "$dest" ] && [ -n "$(ls -A "$dest")" ]; then
    echo "$dest: not empty (the image would hold whatever is there)" >&2
    exit 1
fi

# Copies a file to the same path under $dest, following symlinks (the library's real
# bytes under the name the loader looks for). Executable, as the loader must be.
place() {
    install -D -m 0755 "$1" "$dest$1"
}

# Every shared library of an ELF file, and the loader, by the paths ldd resolved.
# A dependency ldd cannot find fails the build instead of an image that cannot start.
libraries() {
    local out
    out="$(ldd "$1")" || { echo "ldd $1 failed" >&2; return 1; }
    if grep -q 'not found' <<<"$out"; then
        echo "$1: missing libraries:" >&2
        grep 'not found' <<<"$out" >&2
        return 1
    fi
    # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and
    # "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out"
}

elves=()
install -D -m 0755 "$binary" "$dest/usr/local/bin/$name"
# Without its DWARF (the release profile's line tables: 118 of the control plane's 154 MB);
# the symbol table stays, so a panic's backtrace still names functions.
objcopy --strip-debug "$dest/usr/local/bin/$name"
elves+=("$binary")

if [ "$kind" = proxy ]; then
    xtables=/usr/sbin/xtables-nft-multi
    # /usr/lib/<multiarch>/xtables: where libxtables was built to look.
    extensions="$(echo /usr/lib/*/xtables)"
    for file in "$xtables" "$extensions"/libxt_{tcp,owner,REDIRECT,standard}.so; do
        [ -f "$file" ] || { echo "$file is missing: apt-get install iptables" >&2; exit 1; }
        place "$file"
        elves+=("$file")
    done
    # The multi-call binary picks what to be by the name it was started as.
    for command in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do
        ln -s xtables-nft-multi "$dest/usr/sbin/$command"
    done
fi

for elf in "${elves[@]}"; do
    libraries "$elf"
done | sort -u | while read -r library; do
    place "$library"
done

# What the image will hold, for the build log.
(cd "$dest" && find . -mindepth 1 \( -type f -o -type l \) | sed 's/^\.//' | sort) >&2
