"""One module per CLI stage (python -m pipeline <stage>); each orchestrates the libraries beside this package."""
