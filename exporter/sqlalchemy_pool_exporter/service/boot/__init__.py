"""`pool-exporter run` puts this folder first on PYTHONPATH: its sitecustomize.py runs in every Python process."""
