"""The connector runtime (Ascend-style custom Python read connectors).

A connector file defines ``context(credentials)``, ``list_objects(context,
metadata)``, exactly one read function (``read_bytes``,
``read_pandas_dataframe``, ``read_spark_dataframe`` or ``read_arrow``) and
optionally ``infer_schema``. A run of a connector step is a *refresh*:

1. one worker lists the objects (``list_objects`` from the root, then again for
   every prefix, recursively) and hands the leaves back to the host
   (:mod:`.worker`, :mod:`.contract`);
2. the host compares them with the stored partition records and reads only new
   or changed partitions, or all of them when the connector's code changed;
   partitions no longer listed lose their rows (:mod:`.host`);
3. a pool of workers reads the partitions in parallel; each partition's rows
   replace its previous rows together with its new fingerprint, in one store
   transaction per partition (:mod:`.readers` turns what the read function
   returns into Arrow batches).
"""
