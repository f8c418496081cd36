"""Research options of the MoE gate behind one seam: base.py (the GateOption hooks), registry.py
(the options in the order the step applies them), one module per option, router_state.py (the
non-parameter state some options keep). The faithful configuration enables none."""
