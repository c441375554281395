"""The topology is declared once (streams/topology.py): the README's tables and the worker agree with it."""

from __future__ import annotations

import re
from pathlib import Path

from speakerflow.streams.stages.diarize import DiarizeProcessor
from speakerflow.streams.stages.match import MatchProcessor
from speakerflow.streams.stages.requests import EnrollProcessor, VerifyProcessor
from speakerflow.streams.stages.sink import PostgresSink
from speakerflow.streams.topology import ROLES, STAGES, TOPIC_SPECS, stage, stages_markdown
from speakerflow.streams.worker import ALL_ROLES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_stage_table_is_the_generated_one() -> None:
    assert stages_markdown() in README


def test_readme_topic_table_lists_the_declared_topics() -> None:
    section = README[README.index("| topic (`speakerflow.` + ) |") :].split("\n\n", 1)[0]
    rows = [line for line in section.splitlines()[2:] if line.startswith("|")]
    documented = [tuple(re.findall(r"`([^`]+)`", row.split("|")[c])[0] for c in (1, 3)) for row in rows]
    assert documented == [(spec.name, spec.record) for spec in TOPIC_SPECS]


def test_every_stage_topic_is_a_declared_topic() -> None:
    declared = {spec.name for spec in TOPIC_SPECS}
    for spec in STAGES:
        assert set(spec.consumes + spec.reads + spec.writes) <= declared, spec.role


def test_worker_roles_and_processors_follow_the_declaration() -> None:
    assert ALL_ROLES == ROLES
    for processor in (DiarizeProcessor, MatchProcessor, EnrollProcessor, VerifyProcessor, PostgresSink):
        assert processor.topics == stage(processor.role).consumes, processor.role
