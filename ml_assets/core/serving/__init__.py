"""Everything a prediction needs, one module per purpose (the HTTP door is `ml_assets/api.py`):

- loader: a registered version loaded hash-verified (`ServableModel`), and its fresh-process reload proof
- request_parsing: request parsing, the fields a caller sends typed and checked
- lookups: request rows completed with the modelling table's joins and derived columns
- online_model: the served model per pipeline and its hot swap (`OnlineModel`)
- bundle: the champion published as files for an API that never opens the warehouse (another host)
- skew: the skew check, online against batch scores of the same rows
- batch_scores: the champion's scores of a partition, as a table and Parquet files
- request_log: the served rows, logged to Parquet for the drift monitor
"""
