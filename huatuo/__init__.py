"""Shared mechanics of the HuatuoGPT-o1 stage scripts: LLM client, resumable store, prompt
templates, reward, and tiny offline models. Stage scripts import this package; it imports none
of them."""
