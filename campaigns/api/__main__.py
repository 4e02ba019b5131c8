"""``python -m campaigns.api``: serve the HTTP service with uvicorn."""

from campaigns.api.serve import main

if __name__ == "__main__":
    main()
