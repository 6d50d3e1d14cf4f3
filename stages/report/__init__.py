"""`kbvq report`: figures and a `report.md` from what the stages of a run already saved.

Modules: `data` (reading a run's shards), `core` (pure math on moments), `storage` (Table 8's
accounting), `figures` (matplotlib, headless), `markdown` (text), `sections` (one per figure),
`build` (the entry point, `write_report`).
"""
