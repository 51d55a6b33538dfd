"""Data helpers: context templates for requests without given contexts."""
