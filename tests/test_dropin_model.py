"""The wrapper and its envoys as nnsight 0.4.11 code uses them, and tensors made in a
trace or session.

- ``model.to(...)`` returns the wrapper in nnsight 0.4.11 (``Envoy.to`` the envoy);
  ``.cuda()``, ``.cpu()``, ``.eval()``, ``.train()``, ``.half()`` (and ``float`` /
  ``double`` / ``bfloat16`` / ``requires_grad_``) return the bare module there; here
  they all return the wrapper (``model = model.eval()`` keeps working). ``model.device``.
- A submodule named ``output`` / ``input`` / ``inputs`` (BERT's, RoBERTa's, ViT's layers)
  is reachable under its name, and the module's own value moves to ``nns_output`` /
  ``nns_input`` / ``nns_inputs``, with nnsight 0.4.11's warning.
- ``proxy.attr = value`` (``model.layer1.output.requires_grad = True``) is recorded and
  set on the value when the model runs, as in nnsight 0.4.11.
- A tensor made inside a trace or session (``torch.nn.Parameter(...)``) is a real
  tensor here (nnsight 0.4 patches ``torch.nn.Parameter`` into a proxy): ``.save()``
  returns it, and later traces use it. Optimizers made in a session are recorded
  (nnsight 0.4 patches their classes too), so ``optimizer.step()`` runs in order with
  the session's traces: nnsight's LoRA tutorial trains.
- ``nnsight.local()``, ``tracer.log``, ``session.log``, ``CONFIG``'s nnsight fields,
  ``CONFIG.save()``, ``CONFIG.set_default_*``.

References: plain torch (hooks, autograd, a hand-written training loop).
"""

import json
import warnings

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(1, 5)


# -- module methods keep the wrapper --------------------------------------------------------------


@pytest.mark.parametrize("method", ["to", "cpu", "eval", "train", "half", "float", "double", "bfloat16"])
def test_module_methods_return_the_wrapper(net, model, method):
    args = ("cpu",) if method == "to" else ()
    assert getattr(model, method)(*args) is model
    assert getattr(model.layer1, method)(*args) is model.layer1
    if method in ("half", "double", "bfloat16"):
        assert net.layer1.weight.dtype == {"half": torch.half, "double": torch.double, "bfloat16": torch.bfloat16}[method]


def test_a_moved_or_switched_model_still_traces(net, model, x):
    model = model.to("cpu").eval().requires_grad_(False)
    assert not net.training and not net.layer1.weight.requires_grad
    with model.trace(x):
        out = model.output.save()
    assert_close(out, net(x))
    assert model.device == torch.device("cpu")
    assert model.train() is model and net.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_returns_the_wrapper(net, model):
    assert model.cuda() is model and model.device.type == "cuda"
    assert model.cpu() is model


def test_a_submodule_named_like_a_module_method_hides_it(model, net, x):
    class Double(torch.nn.Module):
        def forward(self, t):
            return t * 2

    model.layer1.double = Double()
    assert isinstance(model.layer1.double, nnsight.Envoy)
    with model.trace(x):
        out = model.layer1.double(model.layer1.output).save()
    assert_close(out, net.layer1(x) * 2)


# -- submodules named output / input ----------------------------------------------------------------


class Out(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(4, 4)

    def forward(self, h, residual):
        return self.dense(h) + residual


class Layer(torch.nn.Module):
    """Shaped like a BERT layer: `intermediate` then a submodule named `output`."""

    def __init__(self):
        super().__init__()
        self.intermediate = torch.nn.Linear(4, 4)
        self.output = Out()

    def forward(self, h):
        return self.output(self.intermediate(h), h)


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.ModuleList([Layer(), Layer()])

    def forward(self, h):
        for layer in self.layer:
            h = layer(h)
        return h


def hooked_values(net, x, modules):
    values = {}
    handles = [m.register_forward_hook(lambda m, i, o, key=key: values.__setitem__(key, o.clone())) for key, m in modules]
    try:
        out = net(x)
    finally:
        for h in handles:
            h.remove()
    return values, out


def test_a_submodule_named_output_is_reachable_and_nns_output_is_the_modules(x):
    torch.manual_seed(0)
    net = Stack()
    with pytest.warns(UserWarning, match="mounted at `.nns_output`"):
        model = nnsight.NNsight(net)
    h = torch.rand(2, 4)
    layer = model.layer[0]
    assert isinstance(layer.output, nnsight.Envoy) and layer.output._module is net.layer[0].output
    with model.trace(h):
        layer_out = layer.nns_output.save()
        sub_out = layer.output.output.save()
        dense_out = layer.output.dense.output.save()
        sub_in = layer.output.input.save()
        layer_in = layer.input.save()
    ref, _ = hooked_values(net, h, [("layer", net.layer[0]), ("sub", net.layer[0].output), ("dense", net.layer[0].output.dense)])
    assert_close(layer_out, ref["layer"])
    assert_close(sub_out, ref["sub"])
    assert_close(dense_out, ref["dense"])
    assert_close(sub_in, net.layer[0].intermediate(h))
    assert_close(layer_in, h)
    # A swap through nns_output, and the mount concerns that module only.
    with model.trace(h):
        layer.nns_output = layer.nns_output * 0
        out = model.output.save()
    assert_close(out, net.layer[1](torch.zeros(2, 4)))
    assert not isinstance(type(model.layer[0].intermediate).__dict__.get("output"), nnsight.Envoy)
    with model.trace(h):
        plain = model.layer[0].intermediate.output.save()
    assert_close(plain, net.layer[0].intermediate(h))


def test_iterations_of_a_module_with_an_output_submodule():
    torch.manual_seed(0)
    layer = Layer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nnsight.NNsight(torch.nn.Sequential(layer))
    h = torch.rand(1, 4)
    with model.trace(h):
        first = model[0].iter[0].nns_output.save()
        sub = model[0].iter[0].output.dense.output.save()
    assert_close(first, layer(h))
    assert_close(sub, layer.output.dense(layer.intermediate(h)))


def test_bert_layers(x):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    with pytest.warns(UserWarning, match="nns_output"):
        model = nnsight.NNsight(bert)
    ids = torch.tensor([[1, 2, 3, 4]])
    layer = model.encoder.layer[0]
    with model.trace(ids):
        dense = layer.output.dense.output.clone().save()  # (the edit below is in place)
        attn_dense = layer.attention.output.dense.output.save()
        layer.output.dense.output[:] = 0
        block = layer.nns_output.save()
    hooked = {}

    def keep(key, pick=lambda o: o):
        def hook(module, inputs, output):
            hooked[key] = pick(output).clone()  # (returns None: the output stays)

        return hook

    layer0 = bert.encoder.layer[0]
    handles = [
        layer0.output.dense.register_forward_hook(keep("dense")),
        layer0.attention.output.dense.register_forward_hook(keep("attn")),
        layer0.output.dense.register_forward_hook(lambda m, i, o: torch.zeros_like(o)),
        layer0.register_forward_hook(keep("block", lambda o: o[0])),
    ]
    try:
        bert(ids)
    finally:
        for h in handles:
            h.remove()
    assert_close(dense, hooked["dense"])
    assert_close(attn_dense, hooked["attn"])
    assert_close(block[0], hooked["block"])


# -- setting attributes on proxies -------------------------------------------------------------------


def test_setting_requires_grad_on_a_frozen_models_value(net, model, x):
    net.requires_grad_(False)
    with model.trace(x):
        model.layer1.output.requires_grad = True
        grad = model.layer1.output.grad.save()
        model.output.sum().backward()
    h = net.layer1(x).requires_grad_(True)
    net.layer2(h).sum().backward()
    assert_close(grad, h.grad)


def test_setting_an_attribute_after_the_trace_sets_it_on_the_value(net, model, x):
    with model.trace(x):
        out = model.output.save()
        holder = {"out": out}
    holder["out"].tag = "seen"
    assert out.tag == "seen"


# -- tensors made in a trace or session ----------------------------------------------------------------


def test_a_parameter_made_in_a_trace_can_be_saved_and_trained(net, model, x):
    net.requires_grad_(False)
    with model.trace(x):
        scale = torch.nn.Parameter(torch.tensor(2.0)).save()
        model.layer1.output = model.layer1.output * scale
        loss = model.output.sum().save()
        loss.backward()
    ref_scale = torch.nn.Parameter(torch.tensor(2.0))
    ref_loss = net.layer2(net.layer1(x) * ref_scale).sum()
    ref_loss.backward()
    assert isinstance(scale, torch.nn.Parameter)
    assert_close(loss, ref_loss)
    assert_close(scale.grad, ref_scale.grad)


class LORA(torch.nn.Module):
    """nnsight's LoRA tutorial (0.4 docs), on the tiny model's layer1."""

    def __init__(self, module, dim_in, dim_out, r):
        super().__init__()
        self.r = r
        self.module = module
        self.WA = torch.nn.Parameter(torch.randn(dim_in, self.r), requires_grad=True).save()
        self.WB = torch.nn.Parameter(torch.randn(self.r, dim_out) / 4, requires_grad=True).save()

    def __call__(self, alpha=1.0):
        A_x = torch.matmul(self.module.input, self.WA)
        BA_x = torch.matmul(A_x, self.WB)
        h = BA_x + self.module.output
        self.module.output = h * alpha

    def parameters(self):
        return [self.WA, self.WB]


@pytest.fixture(params=["plain", "own __new__"])
def optimizer_classes(request):
    """torch's optimizers as they are, or each with a ``__new__`` of its own (what
    importing nnsight 0.4.11 does to them): a session records their construction either way."""
    if request.param == "plain":
        yield
        return
    classes = [torch.optim.AdamW, torch.optim.SGD]
    had = {cls: cls.__dict__.get("__new__") for cls in classes}

    def own_new(cls, *args, **kwargs):
        return object.__new__(cls)

    for cls in classes:
        cls.__new__ = own_new
    try:
        yield
    finally:
        for cls, before in had.items():
            if before is None:
                del cls.__new__
            else:
                cls.__new__ = before


def test_the_lora_tutorial_trains_as_a_training_loop_does(net, model, optimizer_classes):
    net.requires_grad_(False)
    torch.manual_seed(7)
    batches = [(torch.rand(3, 5), torch.rand(3, 2)) for _ in range(4)]

    torch.manual_seed(11)
    with model.session() as session:
        lora = LORA(model.layer1, 5, 10, 2)
        optimizer = torch.optim.AdamW(lora.parameters(), lr=0.1)
        with session.iter(batches) as batch:
            with model.trace(batch[0]):
                lora()
                loss = torch.nn.functional.mse_loss(model.output, batch[1])
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    torch.manual_seed(11)
    WA = torch.nn.Parameter(torch.randn(5, 2))
    WB = torch.nn.Parameter(torch.randn(2, 10) / 4)
    initial = WA.detach().clone()
    ref_optimizer = torch.optim.AdamW([WA, WB], lr=0.1)
    for inputs, target in batches:
        h = net.layer1(inputs) + inputs @ WA @ WB
        torch.nn.functional.mse_loss(net.layer2(h), target).backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()

    assert (WA - initial).abs().max() > 0.1  # (it trained)
    assert_close(lora.WA, WA)
    assert_close(lora.WB, WB)
    assert lora.WA.grad is None  # zero_grad ran last
    # The trained LoRA applies in a later trace.
    x = torch.rand(1, 5)
    with model.trace(x):
        lora()
        out = model.output.save()
    assert_close(out, net.layer2(net.layer1(x) + x @ WA @ WB))


def test_an_optimizer_outside_a_session_is_a_plain_one(net):
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD(params, lr=1.0)
    assert type(optimizer) is torch.optim.SGD
    with nnsight.NNsight(net).session():
        pass
    assert type(torch.optim.SGD(params, lr=1.0)) is torch.optim.SGD


# -- nnsight.local, logging, CONFIG ---------------------------------------------------------------------


def test_local_records_as_usual(net, model, x):
    with model.trace(x):
        with nnsight.local():
            h = (model.layer1.output * 2).save()
        doubled = nnsight.local(lambda t: t * 3)(model.layer1.output).save()
    assert_close(h, net.layer1(x) * 2)
    assert_close(doubled, net.layer1(x) * 3)

    @nnsight.local
    def total(t):
        return t.sum()

    with model.trace(x) as tracer:
        s = total(model.layer1.output).save()
        with tracer.local() as local:
            s2 = local.apply(torch.sum, model.layer1.output).save()
    assert_close(s, net.layer1(x).sum())
    assert_close(s2, net.layer1(x).sum())


@pytest.mark.python_fallback  # print
def test_log_prints_when_the_model_runs(net, model, x, capsys):
    with model.trace(x) as tracer:
        tracer.log("layer1 sum:", model.layer1.output.sum())
        print("recorded")
    out = capsys.readouterr().out
    assert out.index("recorded") < out.index("layer1 sum:")
    assert f"{net.layer1(x).sum().item():.4f}" in out
    with model.session() as session:
        with model.trace(x):
            s = model.layer1.output.sum()
        session.log("session:", s)
        nnsight.log("module-level:", s)
    out = capsys.readouterr().out
    assert "session:" in out and "module-level:" in out


def test_config_has_nnsights_fields(monkeypatch, tmp_path):
    config = nnsight.CONFIG
    for name in ("LOGGING", "REMOTE_LOGGING", "DEBUG", "CONTROL_FLOW_HANDLING", "FRAME_INJECTION", "GLOBAL_TRACING"):
        assert hasattr(config.APP, name)
    for name in ("HOST", "SSL", "FORMAT", "ZLIB", "APIKEY", "JOB_ID"):
        assert hasattr(config.API, name)
    path = tmp_path / "sub" / "config.json"
    monkeypatch.setenv("FASTINTERLEAVE_CONFIG", str(path))
    monkeypatch.setattr(config.APP, "DEBUG", config.APP.DEBUG)
    monkeypatch.setattr(config.API, "APIKEY", config.API.APIKEY)
    config.set_default_api_key("key-123")
    config.set_default_app_debug(False)
    saved = json.loads(path.read_text())
    assert saved["API"]["APIKEY"] == "key-123" and saved["APP"]["DEBUG"] is False
    assert config.model_dump()["APP"]["DEBUG"] is False
    fresh = type(config)()
    fresh._load(str(path))
    assert fresh.API.APIKEY == "key-123" and fresh.APP.DEBUG is False
    assert fresh.APP.FRAME_INJECTION is True
