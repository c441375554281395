"""README blocks written from the code, so that the defaults it quotes cannot go stale.

A block sits between `<!-- generated: NAME -->` and `<!-- end generated -->`. `make readme` (that is,
`python -m speakerflow.streams.readme`) rewrites every block; tests/test_readme.py fails while one differs.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from speakerflow.streams.settings import REPO_ROOT, Settings, config_table

README = REPO_ROOT / "README.md"
BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def _n(value: float) -> str:
    return f"{value:g}"


def enrollment_text() -> str:
    from speakerflow.gallery.enrollment import EnrollmentPolicy

    policy = EnrollmentPolicy()
    return (
        f"An enrollment needs at least **{_n(policy.min_speech_s)} s of speech** after VAD, over all its "
        f"files together (at most {_n(policy.max_total_s)} s of audio in one request); less is refused "
        "with the reason, as are clipped, too faint or two-voice samples.\n"
    )


def identification_text() -> str:
    from speakerflow.gallery.matcher import rules_for
    from speakerflow.processors.scoring import DEFAULT_THRESHOLDS

    defaults = Settings()
    threshold = DEFAULT_THRESHOLDS[defaults.embedder]
    family = {"campplus": "CAM++"}.get(defaults.embedder, defaults.embedder.upper())
    rules = rules_for(defaults.embedder)  # the default family's; SPEAKERFLOW_MATCH_MARGIN -1 keeps them
    margin, sure, pool = _n(rules["margin"]), _n(rules["sure_offset"]), _n(rules["consistency"])
    pooled = f"threshold + {pool}" if rules["consistency"] else "the threshold"
    return f"""\
**Identification** (`streams/stages/match.py` calls `gallery/matcher.py`): each diarized segment is
identified from its own embedding, pooled with the segments of the same diarized label that sound like it
(cosine of at least {pooled}). Segments that do not sound alike are not pooled, because live
diarization sometimes puts two voices in one label. A segment gets a name only if:
- its score reaches the calibrated threshold ({family}, the default embedder: {_n(threshold)} without a
  calibration file; `SPEAKERFLOW_MATCH_THRESHOLD` overrides it), and
- the best voiceprint beats the runner-up by `SPEAKERFLOW_MATCH_MARGIN` (default -1, the embedder
  family's: {margin} for {family}). This check is skipped when the score is at least threshold + {sure}
  (a sure score). A stranger tends to score about the same against several voiceprints; an enrolled
  speaker stands out from the rest.

Otherwise the segment is `UNKNOWN`, and it still carries the top-k candidates and their scores. Its
`confidence` says how sure the label is, a name's or UNKNOWN's alike: a name's is
sigmoid(slope × (score − threshold)); UNKNOWN's is 1 − sigmoid(slope × (s − bar)), with s the best
score of the speakers still open to the label and bar the threshold, or, when the margin rule refused
the label, s the best score and bar threshold + {sure}. Both are at least 0.5, 0.5 at the boundary
(slope: see calibration below).
"""


BLOCKS: dict[str, Callable[[], str]] = {
    "config": lambda: config_table() + "\n",
    "enrollment": enrollment_text,
    "identification": identification_text,
}


def render(text: str) -> str:
    """`text` with every generated block rewritten."""

    def fill(match: re.Match) -> str:
        name = match.group(2)
        if name not in BLOCKS:
            raise KeyError(f"README names an unknown generated block {name!r}")
        return match.group(1) + BLOCKS[name]() + match.group(4)

    return BLOCK.sub(fill, text)


def main(path: Path = README) -> int:
    text = path.read_text()
    new = render(text)
    if new != text:
        path.write_text(new)
        print(f"rewrote the generated blocks of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else README))
