"""Token streams: the on-disk token cache."""

from hybridopt.models.tokenizer import train_bpe_tokenizer


def test_a_damaged_token_cache_is_rebuilt_with_a_warning(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from hybridopt.data.corpus import Document
    from hybridopt.data.blocks import cached_token_stream

    docs = [Document(f"d{i}", f"document number {i} says hello to the cache") for i in range(20)]
    tokenizer = train_bpe_tokenizer((d.text for d in docs), 300)
    cache = tmp_path / "tokens"
    first = cached_token_stream(docs, tokenizer, cache, "tok")
    (path,) = cache.glob("*.safetensors")
    for damage in (lambda: path.write_bytes(path.read_bytes()[:50]),  # truncated
                   lambda: save_file({"tokens": torch.full((5,), 10_000)}, str(path))):  # ids beyond the vocabulary
        damage()
        again = cached_token_stream(docs, tokenizer, cache, "tok")
        assert torch.equal(again, first)
        assert "ignoring the damaged token cache" in capsys.readouterr().err
        assert torch.equal(cached_token_stream(docs, tokenizer, cache, "tok"), first)  # rewritten, read silently
        assert capsys.readouterr().err == ""
