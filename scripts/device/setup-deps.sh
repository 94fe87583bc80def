#!/usr/bin/env bash
# Device machine (no apt, no internet): unpack the Debian -dev packages carried in .deps/
# (made here with `apt-get download`, see the list below) into /opt/deps and print the exports
# the build needs. Usage: eval "$(bash scripts/device/setup-deps.sh)"
#   packages: libfmt-dev libfmt9 libcli11-dev nlohmann-json3-dev libpcre2-dev libpcre2-8-0
#             libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libcpp-httplib-dev libxxhash-dev
#             libxxhash0 libgtest-dev libgmock-dev googletest libcpp-httplib0.11 libbrotli-dev
#             libbrotli1 libssl-dev libssl3 zlib1g-dev zlib1g (cpp-httplib.pc requires the last ones)
#             libboost-dev libboost1.74-dev (the server's Boost.Beast/Asio, header-only)
set -euo pipefail
cd "$(dirname "$0")/../.."
ls .deps/*.deb >/dev/null 2>&1 || { echo "setup-deps: no .deps/*.deb (carry .deps)" >&2; exit 1; }
mkdir -p /opt/deps
for f in .deps/*.deb; do dpkg -x "$f" /opt/deps; done
# pkg-config files carry prefix=/usr: point them at /opt/deps/usr.
find /opt/deps -name '*.pc' -exec sed -i 's#^prefix=/usr#prefix=/opt/deps/usr#' {} +
pc=$(find /opt/deps -type d -name pkgconfig | tr '\n' ':')
libdirs=$(find /opt/deps -type d \( -path '*/lib/x86_64-linux-gnu' -o -path '*/usr/lib' \) | tr '\n' ':')
echo "export CMAKE_PREFIX_PATH=/opt/deps/usr\${CMAKE_PREFIX_PATH:+:\$CMAKE_PREFIX_PATH}"
echo "export PKG_CONFIG_PATH=${pc}\${PKG_CONFIG_PATH:-}"
echo "export LD_LIBRARY_PATH=${libdirs}\${LD_LIBRARY_PATH:-}"
echo "export LIBRARY_PATH=${libdirs}\${LIBRARY_PATH:-}"
