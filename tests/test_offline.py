"""Nothing reaches the network at import or test time."""

import socket
import subprocess
import sys
import textwrap

import pytest

from diffalign.testing import netguard


def test_guard_blocks_non_loopback_and_allows_loopback():
    with pytest.raises(netguard.NetworkAccessError):
        socket.create_connection(("93.184.216.34", 80), timeout=1)
    with pytest.raises(netguard.NetworkAccessError):
        socket.getaddrinfo("huggingface.co", 443)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.create_connection(srv.getsockname(), timeout=1)
    c.close()
    srv.close()


def test_importing_every_package_attempts_no_connection():
    code = textwrap.dedent(
        """
        import os, pkgutil, importlib
        os.environ.pop("HF_HUB_OFFLINE", None)   # the guard, not the env var, must keep us offline
        from diffalign.testing import netguard
        netguard.install()
        import diffalign, samplers, rewards, trainers
        for pkg in (diffalign, samplers, rewards, trainers):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if m.name.startswith("diffalign.testing"):
                    continue
                importlib.import_module(m.name)
        print("attempts:", netguard.attempts)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "attempts: []" in out.stdout
