"""The exercise notebooks (labN_*.ipynb here) raise NotImplementedError by design and are stored without
outputs: nbval must not collect them. Their worked solutions in solutions/ are collected and compared."""

collect_ignore_glob = ["lab*.ipynb"]
