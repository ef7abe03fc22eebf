"""History page: every kept run (``lab.store``), from every session and the command line.

Lists runs with filters (kind, model, when), ticks rows to pick them, reopens one on its own page, sets two
side by side, exports the list as CSV or JSON, and deletes a run after a
confirmation. The store is a SQLite file on this machine, so runs outlive the
tab, the browser and the server.
"""

from __future__ import annotations

from datetime import datetime, timezone

import streamlit as st

from app import render_history, saved, state
from lab.store import export_runs

key = state.widget_key
CONFIRM_KEY = "history:confirm_delete"  # the id a Delete click asks to confirm
DELETED_KEY = "history:deleted"  # what the last delete did, said once
MAX_RUNS = 500

PICKED_KEY = "history:picked"  # the table rows ticked at the last rerun, so only a new tick moves the pickers
state.set_defaults(st.session_state, {"history.kinds": [], "history.model": "any", "history.parts": False,
                                      "history.window": "any time"})
st.title("History")
st.markdown("Every finished run is kept here, from the app's pages (any session on this server) and from "
            "`python -m lab` commands: the store is one SQLite file on this machine.")

store = saved.store()
if store is None:
    st.error(st.session_state.get(saved.ERROR_KEY, "The results store cannot be opened."), icon=":material/database:")
    st.stop()
st.caption(f"Store: `{store.path}` (set `LAB_RESULTS_DB` to use another file).")
if (note := st.session_state.pop(DELETED_KEY, None)) is not None:
    st.success(note, icon=":material/delete:")

every = store.list_runs(limit=MAX_RUNS)
kinds = sorted({r.kind for r in every})
model_names = sorted({name for r in every for name in r.models.values() if name})
# a filter value that names a kind or model no longer kept (deleted, or another store) is dropped, not refused
st.session_state[key("history.kinds")] = [k for k in st.session_state[key("history.kinds")] if k in kinds]
filter_cols = st.columns([2, 2, 1.3, 1])
filter_cols[0].multiselect("Kind", kinds, key=key("history.kinds"), placeholder="every kind")
if st.session_state[key("history.model")] not in ("any", *model_names):
    st.session_state[key("history.model")] = "any"
filter_cols[1].selectbox("Model", ["any", *model_names], key=key("history.model"))
filter_cols[2].selectbox("When", list(render_history.WINDOWS), key=key("history.window"),
                         help="Only the runs kept in this window (times are UTC).")
filter_cols[3].toggle("Parts too", key=key("history.parts"),
                      help="Also list each finished part of a long run: a sweep's batch sizes, a comparison's prompts.")
chosen_kinds = st.session_state[key("history.kinds")] or None
chosen_model = st.session_state[key("history.model")]
runs = store.list_runs(chosen_kinds, None if chosen_model == "any" else chosen_model, limit=MAX_RUNS,
                       top_level=not st.session_state[key("history.parts")])
runs = render_history.within(runs, st.session_state[key("history.window")], datetime.now(timezone.utc))

if not runs:
    st.info("No runs kept yet" + (" that match the filters." if every else ": run something on another page, or "
            "`python -m lab generate ...`."), icon=":material/history:")
    st.stop()

by_label = {render_history.label(r): r for r in runs}
labels = list(by_label)
table = st.dataframe(render_history.runs_frame(runs), hide_index=True, width="stretch", on_select="rerun",
                     selection_mode="multi-row", key="history:table")
picked = [labels[i] for i in table.selection.rows if i < len(labels)]
if picked != st.session_state.get(PICKED_KEY, []):  # a new tick in the table moves the pickers below
    st.session_state[PICKED_KEY] = picked
    if picked:
        st.session_state["history:open"] = picked[-1]
    if len(picked) >= 2:
        st.session_state["history:a"], st.session_state["history:b"] = picked[-2], picked[-1]
st.caption("Tick a row to open it below; tick two to compare them side by side.")

download_cols = st.columns(2)
download_cols[0].download_button("Download CSV", export_runs(runs, "csv"), file_name="runs.csv", mime="text/csv",
                                 icon=":material/download:")
with_payloads = [store.get_run(r.id) for r in runs] if len(runs) <= 50 else runs
download_cols[1].download_button("Download JSON", export_runs(with_payloads, "json"), file_name="runs.json",
                                 mime="application/json", icon=":material/download:",
                                 help="Every listed run with its settings and figures (and, for up to 50 runs, the "
                                      "full result each page draws again).")

st.subheader("Open a run")
if st.session_state.get("history:open") not in labels:
    st.session_state["history:open"] = labels[0]
chosen = by_label[st.selectbox("Run", labels, key="history:open")]
record = store.get_run(chosen.id)
open_col, delete_col = st.columns(2)
if saved.can_reopen(record):
    if open_col.button("Open on its page", icon=":material/open_in_new:", type="primary"):
        try:
            page = saved.reopen(record, store)
        except ValueError as error:
            st.error(str(error), icon=":material/error:")
        else:
            st.switch_page(page)
else:
    open_col.caption(f"A {record.kind} run has no page to draw it again: its figures and settings are below.")
if delete_col.button("Delete…", icon=":material/delete:"):
    st.session_state[CONFIRM_KEY] = record.id
if st.session_state.get(CONFIRM_KEY) == record.id:
    with st.container(border=True):
        st.warning(f"Delete run #{record.id} ({record.kind}, {render_history.when(record.created_at)})"
                   + (" and its parts" if record.parent_id is None else "") + "? This cannot be undone.")
        yes, no = st.columns(2)
        if yes.button("Yes, delete it", type="primary"):
            count = store.delete_run(record.id)
            for choice in (CONFIRM_KEY, "history:open", "history:a", "history:b"):  # they may name the deleted run
                st.session_state.pop(choice, None)
            st.session_state[DELETED_KEY] = f"Deleted run #{record.id}" + (
                f" and its {count - 1} parts." if count > 1 else ".")
            st.rerun()
        if no.button("Keep it"):
            st.session_state.pop(CONFIRM_KEY, None)
            st.rerun()
with st.expander("Figures and settings"):
    st.json({"figures": record.figures, "settings": record.settings, "machine": record.machine}, expanded=False)

st.subheader("Compare two runs")
if len(runs) < 2:
    st.caption("Two runs are needed.")
else:
    left, right = st.columns(2)
    for choice, default in (("history:a", 0), ("history:b", 1)):  # a default, or what a tick put there: never both
        if st.session_state.get(choice) not in labels:
            st.session_state[choice] = labels[default]
    a = by_label[left.selectbox("First run", labels, key="history:a")]
    b = by_label[right.selectbox("Second run", labels, key="history:b")]
    frame = render_history.side_by_side(a, b)
    st.caption(f"{int(frame['differs'].sum())} of {len(frame)} values differ (shaded).")
    st.dataframe(render_history.highlight_differences(frame), hide_index=True, width="stretch")
