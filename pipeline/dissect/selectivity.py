"""Label selectivity from the scan's own labels (no masks): per unit and data label,

* ``precision_at_k``: the share of the unit's top-k images that carry the label (RUN/topk);
* ``auroc`` (runs scanned with ``--record all`` only): the area under the ROC curve of the unit's per-image
  maximum (RUN/maxima) separating the label's images from every other readable image, ties counted one half
  (the Mann-Whitney statistic with mid-ranks, as sklearn.metrics.roc_auc_score). Images without a label are
  negatives for every label.

Rows: every (unit, label) whose label appears in the unit's top-k, and with maxima every (unit, label) of a label
that some readable image carries. ``rank`` 0 is the unit's strongest label: highest AUROC where there is one,
then highest precision, ties by label. Computed in DuckDB one layer at a time.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.store import DISSECT_SELECTIVITY_SCHEMA, connect, read_manifest, sql_string


def _layer_rows(con, layer: str, with_maxima: bool) -> pa.Table:
    name = sql_string(layer)
    precision = f"""
        k AS (SELECT unit, count(*) AS k FROM topk WHERE layer = {name} GROUP BY unit),
        hits AS (SELECT unit, label, count(*) AS hits FROM topk WHERE layer = {name} AND label IS NOT NULL
                 GROUP BY unit, label),
        positives AS (SELECT label, count(*) AS positives FROM images WHERE status = 'ok' AND label IS NOT NULL
                      GROUP BY label)"""
    if with_maxima:
        rows = f"""
        m AS (SELECT x.unit, x.act, i.label FROM maxima x JOIN images i USING (image_key)
              WHERE x.layer = {name} AND i.status = 'ok'),
        r AS (SELECT unit, label,
                     rank() OVER (PARTITION BY unit ORDER BY act)
                       + (count(*) OVER (PARTITION BY unit, act) - 1) / 2.0 AS midrank,
                     count(*) OVER (PARTITION BY unit) AS n
              FROM m),
        a AS (SELECT unit, label, count(*) AS p, sum(midrank) AS ranks, any_value(n) AS n
              FROM r WHERE label IS NOT NULL GROUP BY unit, label),
        rows AS (SELECT a.unit, a.label, coalesce(hits.hits, 0) AS hits,
                        CASE WHEN a.p < a.n THEN (a.ranks - a.p * (a.p + 1) / 2.0) / (a.p * (a.n - a.p)) END AS auroc
                 FROM a LEFT JOIN hits USING (unit, label))"""
    else:
        rows = "rows AS (SELECT unit, label, hits, CAST(NULL AS DOUBLE) AS auroc FROM hits)"
    return fetch_arrow(
        con,
        f"""
        WITH {precision}, {rows}
        SELECT {name} AS layer, CAST(rows.unit AS INTEGER) AS unit, rows.label,
               rows.hits / k.k AS precision_at_k, CAST(k.k AS INTEGER) AS k, rows.auroc,
               coalesce(positives.positives, 0) AS positives,
               CAST(row_number() OVER (PARTITION BY rows.unit
                                       ORDER BY rows.auroc DESC NULLS LAST, rows.hits DESC, rows.label) - 1
                    AS INTEGER) AS rank
        FROM rows JOIN k USING (unit) LEFT JOIN positives USING (label)
        ORDER BY rows.unit, rank""",
    )


def label_selectivity(run_dir: str) -> pa.Table:
    """The selectivity table of a complete run (DISSECT_SELECTIVITY_SCHEMA)."""
    manifest = read_manifest(run_dir)
    with_maxima = manifest is not None and manifest.get("record") == "all"
    con = connect(run_dir)
    try:
        parts = [_layer_rows(con, info["name"], with_maxima) for info in manifest["layers"]]
    finally:
        con.close()
    tables = [
        pa.table(
            {f.name: t.column(f.name).cast(f.type) for f in DISSECT_SELECTIVITY_SCHEMA},
            schema=DISSECT_SELECTIVITY_SCHEMA,
        )
        for t in parts
    ]
    return pa.concat_tables(tables) if tables else DISSECT_SELECTIVITY_SCHEMA.empty_table()


def strongest_labels(con) -> pa.Table:
    """Per live unit, its rank-0 label (layer, unit, label, precision_at_k, auroc), from the `selectivity` and
    `units` views of a connection (pipeline.store.connect)."""
    return fetch_arrow(
        con,
        """SELECT s.layer, s.unit, s.label, s.precision_at_k, s.auroc
                               FROM selectivity s JOIN units u USING (layer, unit)
                               WHERE s.rank = 0 AND NOT u.dead""",
    )


def fetch_arrow(con, sql: str) -> pa.Table:
    """Run `sql` and return an Arrow table (DuckDB 2.x names it to_arrow_table, 1.x fetch_arrow_table)."""
    relation = con.sql(sql)
    return relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
