"""p50 of `commands.run("true")` through the stock `e2b` SDK against the
same exec through bhatti's own REST API (`POST /sandboxes/{id}/exec`), from
Python, in one run on one sandbox (docs/clients.md, "E2B compatibility").

usage: python e2b_vs_native.py URL KEY [TEMPLATE] [N]
  URL: the daemon (http://127.0.0.1:8080); KEY: a bhatti API key.
Needs the `e2b` package (scripts/test.sh installs it in a venv; the
native side uses the same SDK's HTTP client library, httpx, with one
kept-alive connection like the SDK's). The last line is
`e2b_vs_native_ratio_p50=<ratio>` (target: at most 1.3)."""

import os
import statistics
import sys
import time

import httpx

url, key = sys.argv[1].rstrip("/"), sys.argv[2]
template = sys.argv[3] if len(sys.argv) > 3 else "base"
n = int(sys.argv[4]) if len(sys.argv) > 4 else 200

os.environ["E2B_API_URL"] = f"{url}/e2b"
os.environ["E2B_SANDBOX_URL"] = f"{url}/e2b/envd"
os.environ["E2B_API_KEY"] = key

from e2b import Sandbox  # noqa: E402

sbx = Sandbox.create(template=template)
try:
    native = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"})
    # The SDK runs `/bin/bash -l -c CMD` (bhatti uses /bin/sh where the
    # image has no bash): the native side runs the same.
    probe = native.post(
        f"/sandboxes/{sbx.sandbox_id}/exec", json={"cmd": ["test", "-x", "/bin/bash"]}
    )
    probe.raise_for_status()
    shell = "/bin/bash" if probe.json()["exit_code"] == 0 else "/bin/sh"
    body = {"cmd": [shell, "-l", "-c", "true"]}

    def e2b_once():
        sbx.commands.run("true")

    def native_once():
        r = native.post(f"/sandboxes/{sbx.sandbox_id}/exec", json=body)
        r.raise_for_status()
        assert r.json()["exit_code"] == 0, r.text

    def p50(f):
        for _ in range(min(10, n)):
            f()
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            samples.append(time.perf_counter() - t)
        return statistics.median(samples)

    # Interleaved halves, so drift hits both sides alike.
    e1, n1 = p50(e2b_once), p50(native_once)
    e2, n2 = p50(e2b_once), p50(native_once)
    e, nat = (e1 + e2) / 2, (n1 + n2) / 2
    print(f"samples={n} per side per half (both run `{shell} -l -c true`)")
    print(f"e2b_p50_ms={e * 1000:.2f}")
    print(f"native_p50_ms={nat * 1000:.2f}")
    print(f"e2b_vs_native_ratio_p50={e / nat:.3f}")
finally:
    sbx.kill()
