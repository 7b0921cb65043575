#!/bin/sh
# Builds the example service's package, as a CI job would build tonight's .deb:
#   recipes/hello-service/build-deb.sh [VERSION]   → recipes/hello-service/dist/kiln-hello.deb
# The version (default 1.0.0) goes into the package and its greeting, so a new build
# is a new .deb. The package is reproducible: same version, same bytes.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
version=${1:-1.0.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -a "$here/pkg" "$work/pkg"
sed -i "s/@VERSION@/$version/" "$work/pkg/DEBIAN/control" "$work/pkg/usr/lib/kiln-hello/answer"
mkdir -p "$here/dist"
# Fixed times, owners and order: the same version gives the same bytes.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
find "$work/pkg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH dpkg-deb --root-owner-group -Zgzip --build "$work/pkg" "$here/dist/kiln-hello.deb.partial" >/dev/null
mv "$here/dist/kiln-hello.deb.partial" "$here/dist/kiln-hello.deb"
echo "$here/dist/kiln-hello.deb (kiln-hello $version)"
