//! `tessera model export --format onnx`: the model as an ONNX graph that
//! takes rows encoded per the job's schema and gives the probability of the
//! positive class, the normalisation and the final sigmoid included, for
//! onnxruntime and every serving stack that reads ONNX.
//!
//! The handful of ONNX protobuf messages it writes are declared here (with
//! their field numbers from ONNX's `onnx.proto`) rather than generated from
//! the full schema: only what this graph uses.

use prost::Message;

use super::model::Parts;

/// ONNX IR version 8 (ONNX 1.10+) and the default operator set 13: every
/// runtime of the last years reads them; Sub, Div, MatMul, Add, Relu and
/// Sigmoid are unchanged since.
const IR_VERSION: i64 = 8;
const OPSET: i64 = 13;
/// `TensorProto.DataType.FLOAT`.
const FLOAT: i32 = 1;

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(int64, tag = "1")]
    ir_version: i64,
    #[prost(string, tag = "2")]
    producer_name: String,
    #[prost(string, tag = "3")]
    producer_version: String,
    #[prost(string, tag = "6")]
    doc_string: String,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    opset_import: Vec<OperatorSetIdProto>,
    #[prost(message, repeated, tag = "14")]
    metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, Message)]
struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    domain: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

#[derive(Clone, PartialEq, Message)]
struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(string, tag = "8")]
    name: String,
    /// Little-endian, row-major.
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct ValueInfoProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeProto {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorType>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorType {
    #[prost(int32, tag = "1")]
    elem_type: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
struct Dimension {
    #[prost(int64, optional, tag = "1")]
    dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    dim_param: Option<String>,
}

/// A float tensor `[rows, width]` whose row count is named, not fixed.
fn batch_of(name: &str, width: usize) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorType {
                elem_type: FLOAT,
                shape: Some(TensorShapeProto {
                    dim: vec![
                        Dimension {
                            dim_value: None,
                            dim_param: Some("rows".to_owned()),
                        },
                        Dimension {
                            dim_value: Some(width as i64),
                            dim_param: None,
                        },
                    ],
                }),
            }),
        }),
    }
}

fn initializer(name: &str, dims: &[usize], raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: FLOAT,
        name: name.to_owned(),
        raw_data,
    }
}

fn node(op_type: &str, input: &[&str], output: &str) -> NodeProto {
    NodeProto {
        input: input.iter().map(|s| (*s).to_owned()).collect(),
        output: vec![output.to_owned()],
        name: output.to_owned(),
        op_type: op_type.to_owned(),
    }
}

/// The ONNX file of a model: input `features` [rows, n_features] (float,
/// encoded per the job's schema, on their own scale), output `probability`
/// [rows, 1]; the normalisation in float32, which moves a probability by
/// far less than 1e-5 against Tessera's float64 standardisation.
pub(crate) fn model_file(parts: &Parts) -> Vec<u8> {
    let n_features = parts.mean.len();
    let f32_bytes = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect() };
    let mut initializers = vec![
        initializer("normalization.mean", &[n_features], f32_bytes(&parts.mean)),
        initializer("normalization.std", &[n_features], f32_bytes(&parts.std)),
    ];
    let mut nodes = vec![
        node("Sub", &["features", "normalization.mean"], "centered"),
        node("Div", &["centered", "normalization.std"], "h0"),
    ];
    let last = parts.layers.len() - 1;
    let mut width = n_features;
    for (i, ([d_in, d_out], weight, bias)) in parts.layers.iter().enumerate() {
        let (w, b) = (format!("layers.{i}.weight"), format!("layers.{i}.bias"));
        initializers.push(initializer(&w, &[*d_in, *d_out], weight.to_vec()));
        initializers.push(initializer(&b, &[*d_out], bias.to_vec()));
        let (h, product, logits) = (format!("h{i}"), format!("product{i}"), format!("logits{i}"));
        nodes.push(node("MatMul", &[&h, &w], &product));
        nodes.push(node("Add", &[&product, &b], &logits));
        if i < last {
            nodes.push(node("Relu", &[&logits], &format!("h{}", i + 1)));
        } else {
            nodes.push(node("Sigmoid", &[&logits], "probability"));
        }
        width = *d_out;
    }
    let mut metadata_props: Vec<StringStringEntryProto> = parts
        .metadata
        .iter()
        .map(|(key, value)| StringStringEntryProto {
            key: key.clone(),
            value: value.clone(),
        })
        .collect();
    metadata_props.push(StringStringEntryProto {
        key: "format".into(),
        value: "tessera-model-v1 (onnx)".into(),
    });
    ModelProto {
        ir_version: IR_VERSION,
        producer_name: "tessera".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: "A Tessera federated model: features encoded per the job's schema in, the probability of the \
                     positive class out."
            .into(),
        graph: Some(GraphProto {
            node: nodes,
            name: parts
                .metadata
                .get("job_name")
                .cloned()
                .unwrap_or_else(|| "tessera".into()),
            initializer: initializers,
            input: vec![batch_of("features", n_features)],
            output: vec![batch_of("probability", width)],
        }),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        metadata_props,
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The graph an MLP gives, as it decodes again: the normalisation, then
    /// per layer MatMul and Add, Relu between layers and Sigmoid at the end,
    /// each weight the parameters' very bytes.
    #[test]
    fn an_mlp_becomes_a_normalised_graph_ending_in_a_sigmoid() {
        let (bytes, manifest) = super::super::model::mlp_fixture();
        let parts = Parts::of(&bytes, &manifest.to_string()).unwrap();
        let model = ModelProto::decode(model_file(&parts).as_slice()).unwrap();
        assert_eq!((model.ir_version, model.opset_import[0].version), (IR_VERSION, OPSET));
        let graph = model.graph.unwrap();
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Sub", "Div", "MatMul", "Add", "Relu", "MatMul", "Add", "Sigmoid"]);
        assert_eq!(graph.node.last().unwrap().output, ["probability"]);
        let tensor = |name: &str| graph.initializer.iter().find(|t| t.name == name).unwrap();
        assert_eq!(tensor("layers.0.weight").dims, [2, 3]);
        assert_eq!(tensor("layers.0.weight").raw_data, &bytes[..24]);
        assert_eq!(tensor("layers.1.bias").raw_data, &bytes[48..52]);
        assert_eq!(
            tensor("normalization.std").raw_data,
            [0.25f32.to_le_bytes(), 4.0f32.to_le_bytes()].concat()
        );
        let meta = |key: &str| {
            model
                .metadata_props
                .iter()
                .find(|p| p.key == key)
                .map(|p| p.value.as_str())
        };
        assert_eq!(meta("model_hash"), Some("abc"));
        assert_eq!(meta("format"), Some("tessera-model-v1 (onnx)"));
    }
}
