"""Data: the contract (schema), the embedded synthetic world, record io, tokenizer, transforms and
the Grain pipeline. Import the submodule you need (``from umg_jax.data import pipeline``); this
package imports nothing so that ``import umg_jax.data.schema`` stays cheap."""
