"""The admin API's handlers, one module per resource; the one route table is in admin/app.py."""
