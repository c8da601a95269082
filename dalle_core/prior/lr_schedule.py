"""The prior's learning rate: warm-up, then halved each time the loss plateaus (paper, appendix B.2).

The paper's rule, paraphrased: the learning rate is warmed up linearly to 4.5e-4
over the first 5,000 updates, then halved each time the training loss appears to
plateau, five times in all over about 430,000 updates. The authors judged the
plateaus by looking at the curve; the paper states no detector.

The reading taken here
----------------------
A large run's loss follows roughly a power law, L(t) = a + b t^-alpha: its gain
per update shrinks like 1/t, so late in the run it is far below any fixed
"x% per 1,000 updates" (the detector this module replaces fired all five
halvings in the first ~10k updates of a healthy 430k-update curve; see
tests/test_lr_schedule.py). What stays comparable along the run is the gain per
*log-step*: dL/d(ln t) = -alpha (L - a). So the detector

1. smooths the training loss: the median of each block of `window` updates
   (robust to the odd loss spike; one block = one check);
2. at each block's end, fits a line through the block medians against ln(step),
   over the blocks of the last `span = max(window, lookback * step)` updates
   that came after the last decay (warm-up excluded) - a window of constant
   width in log-steps, scaled to the run;
3. turns the fitted slope into the relative improvement it predicts over the
   span, ``gain = -slope * ln(step / (step - span)) / mean(block medians)``,
   and its standard error `se` from the fit's residuals;
4. calls the check a plateau when even the optimistic reading is flat:
   ``gain + noise_z * se < threshold``;
5. halves the rate after `patience` plateau checks in a row, at least
   `min_gap` updates after the previous decay, at most `max_decays` times.

With `lookback=0, patience=1, min_gap=0, noise_z=0` (the class's defaults) this
reduces to the old bare rule: compare consecutive blocks, decay when the loss
did not improve by `threshold`. `PriorTrainingConfig` carries the paper-scale values
(`lr_plateau_*`; `WarmupThenHalveOnPlateau.from_config`).

The operator
------------
Because the paper's authors decided by looking, an operator can overrule the
detector on a running job: `dalle lr decay|hold|release --run-dir DIR` appends
a request to ``DIR/lr_control.json`` (`request_lr_action`), which the trainer
reads at each log interval (`read_lr_requests`, rank 0, broadcast to all ranks)
and applies in order (`apply_requests`):

- ``decay``: halve now (it counts toward `max_decays`, ignores `min_gap` and a
  hold; refused, and recorded as refused, once `max_decays` are spent);
- ``hold``: the detector may not decay until ``release`` (it keeps checking and
  reports what it sees).

Every decision (detector or operator) is a record in `decisions`, returned to
the trainer (which logs it as an ``lr_schedule`` event) and kept in
`state_dict`, as are the request sequence number applied last, the hold and the
detector's blocks: a resumed run takes the same decisions as an uninterrupted
one, and a request is never applied twice.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import logging
import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from dalle_core.storage import Storage

    from .config import PriorTrainingConfig

log = logging.getLogger(__name__)

CONTROL_FILE = "lr_control.json"
CONTROL_FORMAT = "dalle-lr-control/1"
ACTIONS = ("decay", "hold", "release")


class WarmupThenHalveOnPlateau:
    """Linear warm-up to `lr`, then x`factor` each time the loss plateaus (module docstring)."""

    def __init__(self, lr: float, warmup_steps: int, factor: float = 0.5, max_decays: int = 5,
                 window: int = 1000, threshold: float = 0.01, *, lookback: float = 0.0,
                 patience: int = 1, min_gap: int = 0, noise_z: float = 0.0,
                 total_steps: int = 0, cooldown_steps: int = 0):
        self.lr, self.warmup_steps = float(lr), int(warmup_steps)
        self.total_steps, self.cooldown_steps = int(total_steps), int(cooldown_steps)
        self.factor, self.max_decays = float(factor), int(max_decays)
        self.window, self.threshold = max(1, int(window)), float(threshold)
        self.lookback, self.patience = max(0.0, float(lookback)), max(1, int(patience))
        self.min_gap, self.noise_z = max(0, int(min_gap)), max(0.0, float(noise_z))
        self.decays = 0
        self.held = False
        self.control_seq = 0  # the operator request applied last
        self.last_decay_step: int | None = None
        self.strikes = 0  # plateau checks in a row
        self.blocks: list[tuple[int, float]] = []  # (last update of the block, median loss), since the last decay
        self._cur: list[float] = []  # losses of the block in progress
        self.last_check: dict[str, Any] | None = None
        self.decisions: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, config: PriorTrainingConfig, window: int | None = None,
                    total_steps: int | None = None) -> WarmupThenHalveOnPlateau:
        """The schedule of `config`; `total_steps` (default the config's) is where a
        cooldown (`lr_cooldown_steps`) ends."""
        return cls(config.lr, config.warmup_steps, config.lr_plateau_factor, config.lr_max_decays,
                   window=window or config.lr_plateau_window, threshold=config.lr_plateau_threshold,
                   lookback=config.lr_plateau_lookback, patience=config.lr_plateau_patience,
                   min_gap=config.lr_plateau_min_gap, noise_z=config.lr_plateau_noise_z,
                   total_steps=config.total_steps if total_steps is None else total_steps,
                   cooldown_steps=config.lr_cooldown_steps)

    # --- the rate -----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Learning rate of update number `step` + 1 (step = updates done before it)."""
        base = self.lr * (step + 1) / self.warmup_steps if step < self.warmup_steps else self.lr
        if self.cooldown_steps:  # not the paper's: linear to 0 over the run's last updates (config)
            left = self.total_steps - step  # updates left, this one included
            base *= min(1.0, max(0.0, left / (self.cooldown_steps + 1)))
        return base * self.factor**self.decays

    # --- the detector -----------------------------------------------------------------------------

    def observe(self, step: int, loss: float) -> list[dict[str, Any]]:
        """Feed the loss of update `step` (1-based count of updates done); returns the
        decisions taken (empty, or one detector decay)."""
        if step <= self.warmup_steps or not math.isfinite(loss):
            return []
        self._cur.append(float(loss))
        if len(self._cur) < self.window:
            return []
        self.blocks.append((int(step), statistics.median(self._cur)))
        self._cur = []
        return self._check(int(step))

    def span(self, step: int) -> float:
        return max(float(self.window), self.lookback * step)

    def _check(self, step: int) -> list[dict[str, Any]]:
        span = self.span(step)
        self.blocks = [b for b in self.blocks if b[0] >= step - span]
        n = len(self.blocks)
        if n < (3 if self.noise_z > 0 else 2):  # too little history since warm-up or the last decay
            self.last_check, self.strikes = None, 0
            return []
        xs = [math.log(s) for s, _ in self.blocks]
        ys = [y for _, y in self.blocks]
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        width = math.log(step / (step - span)) if span < step else math.log(step)  # span in log-steps
        scale = width / abs(my) if my else 0.0
        gain = -slope * scale
        se = 0.0
        if n > 2:
            resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
            se = math.sqrt(resid / (n - 2) / sxx) * scale
        plateau = gain + self.noise_z * se < self.threshold
        self.strikes = self.strikes + 1 if plateau else 0
        self.last_check = {"step": step, "gain": gain, "se": se, "threshold": self.threshold,
                           "span": span, "blocks": n, "plateau": plateau, "strikes": self.strikes}
        if not plateau or self.strikes < self.patience:
            return []
        if self.decays >= self.max_decays:
            return []
        if self.last_decay_step is not None and step - self.last_decay_step < self.min_gap:
            return []
        if self.held:
            return []
        return [self._decay(step, "detector", plateau_gain=gain, plateau_se=se, plateau_loss=ys[-1])]

    def _decay(self, step: int, source: str, **info: Any) -> dict[str, Any]:
        self.decays += 1
        self.last_decay_step = step
        self.blocks, self._cur, self.strikes = [], [], 0
        rec = self._record(step, "decay", source, **info)
        log.info("learning rate x%s at update %d (%s, decay %d of %d): now %.3g",
                 self.factor, step, source, self.decays, self.max_decays, rec["new_lr"])
        return rec

    def _record(self, step: int, action: str, source: str, **info: Any) -> dict[str, Any]:
        # keys apart from the trainer's log records' (both go to MLflow as metrics at the same step)
        rec = {"step": int(step), "action": action, "source": source, "lr_decays": self.decays,
               "lr_held": self.held, "new_lr": self.lr_at(step), **{k: v for k, v in info.items() if v is not None}}
        self.decisions.append(rec)
        return rec

    # --- the operator -------------------------------------------------------------------------------

    def apply_requests(self, step: int, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Apply the operator's requests not yet applied (by sequence number), in order."""
        out = []
        for req in sorted(requests, key=lambda r: int(r.get("seq", 0))):
            seq = int(req.get("seq", 0))
            if seq <= self.control_seq:
                continue
            self.control_seq = seq
            action = req.get("action")
            who = {"request_seq": seq, "by": req.get("by"), "note": req.get("note")}
            if action == "decay":
                if self.decays >= self.max_decays:
                    out.append(self._record(step, "refused", "operator", request="decay",
                                            reason=f"all {self.max_decays} decays spent", **who))
                else:
                    out.append(self._decay(step, "operator", **who))
            elif action in ("hold", "release"):
                self.held = action == "hold"
                out.append(self._record(step, action, "operator", **who))
                log.info("learning rate %s by the operator at update %d", action, step)
            else:
                out.append(self._record(step, "refused", "operator", request=action,
                                        reason="unknown action", **who))
        return out

    # --- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"decays": self.decays, "held": self.held, "control_seq": self.control_seq,
                "last_decay_step": self.last_decay_step, "strikes": self.strikes,
                "blocks": [list(b) for b in self.blocks], "cur": list(self._cur),
                "last_check": self.last_check, "decisions": [dict(d) for d in self.decisions]}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.decays = int(s.get("decays", 0))
        self.held = bool(s.get("held", False))
        self.control_seq = int(s.get("control_seq", 0))
        lds = s.get("last_decay_step")
        self.last_decay_step = None if lds is None else int(lds)
        self.strikes = int(s.get("strikes", 0))
        self.blocks = [(int(a), float(b)) for a, b in s.get("blocks", [])]
        self._cur = [float(x) for x in s.get("cur", [])]
        self.last_check = s.get("last_check")
        self.decisions = [dict(d) for d in s.get("decisions", [])]


LRSchedule = WarmupThenHalveOnPlateau  # the name the trainer and older code use


# --- the control file ---------------------------------------------------------------------------------

def read_lr_requests(storage: Storage, key: str = CONTROL_FILE) -> list[dict[str, Any]]:
    """The operator's requests in the control file ([] when there is none or it is unreadable)."""
    try:
        if not storage.exists(key):
            return []
        doc = json.loads(storage.get_bytes(key))
        reqs = doc.get("requests", []) if isinstance(doc, dict) else []
        return [r for r in reqs if isinstance(r, dict) and "seq" in r and "action" in r]
    except (OSError, ValueError) as e:
        log.warning("learning-rate control file %s unreadable, ignored this time: %s", key, e)
        return []


def request_lr_action(storage: Storage, action: str, note: str | None = None, by: str | None = None,
                      key: str = CONTROL_FILE) -> dict[str, Any]:
    """Append an operator request (decay / hold / release) to the control file; returns it."""
    if action not in ACTIONS:
        raise ValueError(f"learning-rate action must be one of {ACTIONS}, got {action!r}")
    reqs = read_lr_requests(storage, key)
    if by is None:
        try:
            by = getpass.getuser()
        except Exception:  # no user name in this environment
            by = None
    req = {"seq": max((int(r["seq"]) for r in reqs), default=0) + 1, "action": action,
           "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "by": by, "note": note}
    doc = {"format": CONTROL_FORMAT, "requests": [*reqs, req]}
    storage.put_bytes(key, (json.dumps(doc, indent=1) + "\n").encode())
    return req


def poll_lr_requests(storage: Storage | None, key: str = CONTROL_FILE) -> list[dict[str, Any]]:
    """`read_lr_requests` on rank 0, the same list on every rank (a collective when distributed)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank0 = not distributed or dist.get_rank() == 0
    reqs = read_lr_requests(storage, key) if (rank0 and storage is not None) else []
    if distributed:
        box = [reqs]
        dist.broadcast_object_list(box, src=0)
        reqs = box[0]
    return reqs
