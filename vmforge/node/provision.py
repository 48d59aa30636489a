"""Two-phase provisioning: after cloud-init has set up the OS and the agent said hello, copy
files in, run commands and wait for health checks; each step with its own timeout, and a
failure names the step and carries its output."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..agent.client import AgentClient
from ..errors import AgentError, AgentTimeout, ProvisionError
from ..spec import HealthCheck, ProvisionStep

__all__ = ["provision", "wait_healthy"]


async def wait_healthy(client: AgentClient, checks: tuple[HealthCheck, ...],
                       timeout: float) -> dict[str, Any]:
    """Poll the guest's health until every check passes."""
    payload = [c.model_dump(exclude_none=True) for c in checks]
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while True:
        last = await client.health(payload, timeout=max(5.0, timeout))
        if last.get("healthy"):
            return last
        if time.monotonic() > deadline:
            failing = [f"{c['name']}: {c['detail']}" for c in last.get("checks", [])
                       if not c["ok"]]
            raise AgentTimeout("health checks still failing: " + "; ".join(failing))
        await asyncio.sleep(1.0)


async def _step(client: AgentClient, step: ProvisionStep, checks: tuple[HealthCheck, ...],
                base: Path) -> str:
    if step.copy_:
        src, dest = step.copy_
        local = Path(src) if Path(src).is_absolute() else base / src
        if not local.exists():
            raise ProvisionError(step.label, f"local path not found: {local}")
        n = await asyncio.wait_for(client.put_tree(local, dest), step.timeout_s)
        return f"copied {n} file(s)"
    if step.run or step.shell:
        argv = list(step.run) if step.run else [step.shell or ""]
        res = await client.exec(argv, shell=bool(step.shell), timeout=step.timeout_s)
        output = (res.stdout + res.stderr).decode(errors="replace")
        if res.timed_out:
            raise ProvisionError(step.label, f"timed out after {step.timeout_s:.0f}s", output)
        if res.exit_code != 0:
            raise ProvisionError(step.label, f"exit code {res.exit_code}"
                                 + (f" (signal {res.signal})" if res.signal else ""), output)
        return output
    if not checks:
        raise ProvisionError(step.label, "wait_health given but the spec has no health_checks")
    await wait_healthy(client, checks, step.timeout_s)
    return "healthy"


async def provision(client: AgentClient, steps: tuple[ProvisionStep, ...],
                    checks: tuple[HealthCheck, ...], base: Path,
                    progress: Callable[[str], None] = lambda _m: None) -> list[dict[str, Any]]:
    """Run the steps in order over a connected agent session; returns a report, raises
    ProvisionError at the first failure."""
    report = []
    for i, step in enumerate(steps, 1):
        progress(f"provision {i}/{len(steps)}: {step.label}")
        t0 = time.monotonic()
        try:
            out = await _step(client, step, checks, base)
        except ProvisionError:
            raise
        except (TimeoutError, AgentError) as exc:
            raise ProvisionError(step.label, str(exc) or "timed out") from exc
        report.append({"step": step.label, "seconds": time.monotonic() - t0,
                       "output": out[-2000:]})
    return report
