"""The recipes, one folder each (the recipe table in recipe_table.py lists them)."""
