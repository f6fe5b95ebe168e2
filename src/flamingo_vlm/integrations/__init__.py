"""Adapters that plug flamingo-vlm models into other tools. Each submodule imports its tool itself,
so importing ``flamingo_vlm`` never needs them: ``flamingo_vlm.integrations.lmms_eval`` (lmms-eval)."""
