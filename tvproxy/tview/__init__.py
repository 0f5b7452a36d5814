"""The TVIEW engine (issue: TVIEW engine). It plugs into sessions through session/hooks.py."""
