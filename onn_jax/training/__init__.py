"""One training step and what it needs: the state, the step (forward, Surprise, gate losses, one
joint update), gate losses and metrics, exact accumulation, the non-finite guard, the sharded
step, the optax chain, schedules, FLOP and memory accounting; options/ holds the research
options of the gate behind one seam."""
