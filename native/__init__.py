"""Pinned llama.cpp runtime: source fetch, patching and cached native builds (see build.py)."""
