"""forgetting: train on two domains, then on the two others; how much of the first is lost?

Phase 1 trains on arithmetic + strings, phase 2 continues (parameters and optimizer state)
on brackets + prose. The rise of the first domains' held-out loss over phase 2 measures
forgetting; routing that keeps domains on separate experts should forget less. Same model
sizes and router kinds as configs/experiments/routing.py; 2 seeds (CPU, minutes).
"""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_routing_experiment", Path(__file__).with_name("routing.py"))
_routing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_routing)


def get_experiment():
    exp = _routing.get_experiment()
    exp.update(name="forgetting", kind="forgetting", seeds=[0, 1],
               phases={"first": ["arithmetic", "strings"], "second": ["brackets", "prose"],
                       "first_steps": 400, "second_steps": 400})
    exp["overrides"] = {**exp["overrides"], "train.eval_every": 100}
    return exp
