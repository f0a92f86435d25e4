"""Stand-ins for running tooz's own tests/test_coordination.py against the lockbroker driver
(tests/test_tooz.py imports this from a sitecustomize in every interpreter of that run: the
pytest subprocess and the processes its tests spawn).

test_coordination.py imports five of tooz's other drivers (etcd3gw, file, ipc, memcached, redis)
only to name their classes in isinstance checks that skip tests for those drivers. Importing them
for real needs their client libraries (etcd3gw, fasteners, msgpack, sysv_ipc, pymemcache, redis).
Stand-ins with classes of the same names keep those checks meaningful (our driver is none of
them) without installing five clients we do not test.
"""

from __future__ import annotations

import sys
import types

_STANDINS = {
    "etcd3gw": ("Etcd3Driver",),
    "file": ("FileDriver",),
    "ipc": ("IPCDriver",),
    "memcached": ("MemcachedDriver",),
    "redis": ("RedisDriver",),
}


def _install() -> None:
    import tooz.drivers  # noqa: PLC0415 - only in the subprocess that loads this plugin

    for name, classes in _STANDINS.items():
        full = f"tooz.drivers.{name}"
        if full in sys.modules:
            continue
        module = types.ModuleType(full, f"stand-in for {full} (tests/tooz_plugin.py)")
        for cls in classes:
            setattr(module, cls, type(cls, (), {}))
        sys.modules[full] = module
        setattr(tooz.drivers, name, module)


_install()
