"""tvproxy: a PostgreSQL transaction pooler that keeps TVIEW read models fresh."""
__version__ = "0.1.0"
