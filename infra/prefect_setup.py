"""What `marc up` puts on the Prefect server: the `process` work pool and the automation that marks dead flow runs.

    python -m infra.prefect_setup POOL      # prints MARC_POOL=created|exists:<type> and MARC_ZOMBIE=created|updated|exists

A flow run whose process dies with it (worker killed, machine gone) would stay RUNNING forever: nothing
is left to report its end. Flow runs send a heartbeat event every `FLOW_HEARTBEAT_S` (the worker sets
PREFECT_FLOWS_HEARTBEAT_FREQUENCY for them); the automation `ZOMBIE_AUTOMATION` marks a `marc` flow run
CRASHED when no heartbeat and no terminal state followed its last heartbeat within `zombie_after_s()`
(MARC_ZOMBIE_AFTER_S, default 300 s: ten missed heartbeats, so a loaded machine does not crash a live run).
It runs in a subprocess of `marc up` (Prefect's client is heavy to import and keeps threads).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

FLOW_NAME = "marc"
"""The flow whose runs the automation watches (flows/marc.py); other flows on the server are left alone."""
FLOW_HEARTBEAT_S = 30
"""Seconds between a flow run's heartbeat events (Prefect's minimum; its default is 180)."""
ZOMBIE_AUTOMATION = "marc: crash flow runs that stopped sending heartbeats"


def zombie_after_s() -> int:
    """Seconds without a heartbeat after which a running `marc` flow run is marked CRASHED."""
    value = int(os.environ.get("MARC_ZOMBIE_AFTER_S", "300"))
    if value < 2 * FLOW_HEARTBEAT_S:
        raise ValueError(f"MARC_ZOMBIE_AFTER_S={value} must be at least {2 * FLOW_HEARTBEAT_S} s "
                         f"(two heartbeat periods), or live flow runs get marked crashed")
    return value


def ensure_work_pool(client, name: str) -> str:
    """Create the `process` work pool `name` if missing; returns 'created:process' or 'exists:<type>'."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        return "exists:" + client.read_work_pool(name).type
    except ObjectNotFound:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return "created:process"
        except ObjectAlreadyExists:
            return "exists:process"


def zombie_automation(within_s: int):
    """The automation: after each heartbeat of a `marc` flow run, expect another heartbeat or a terminal state."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"A `{FLOW_NAME}` flow run sends a heartbeat every {FLOW_HEARTBEAT_S} s while its process lives; "
                    f"after {within_s} s of silence it is marked Crashed (created by `marc up`).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.name": FLOW_NAME}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat from the flow-run process for {within_s} s: its process died "
                    f"(worker or machine killed). Rerun the deployment; finished work is reused.")],
    )


def ensure_zombie_automation(within_s: int) -> str:
    """Create the automation, or update it when its window changed; returns 'created', 'updated' or 'exists'."""
    from prefect.automations import Automation

    wanted = zombie_automation(within_s)
    try:
        current = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:  # "Automation with name ... not found"
        wanted.create()
        return "created"
    if current.trigger.within == wanted.trigger.within and current.enabled:
        return "exists"
    wanted.id = current.id
    wanted.update()
    return "updated"


def main(argv: list[str]) -> int:
    from prefect.client.orchestration import get_client

    (pool,) = argv
    with get_client(sync_client=True) as client:
        print("MARC_POOL=" + ensure_work_pool(client, pool), flush=True)
    print("MARC_ZOMBIE=" + ensure_zombie_automation(zombie_after_s()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
