//! PDU and DIMSE command set encoding and parsing, by hand from PS3.8 section 9.3 and PS3.7
//! section 6.3.1.

use std::collections::BTreeMap;

use super::{APPLICATION_CONTEXT, IMPLICIT_VR_LE, VERIFICATION};

const IMPLEMENTATION_CLASS_UID: &str = "2.25.302845130391405217318620385620945541713";
const IMPLEMENTATION_VERSION_NAME: &str = "DGW_RAW";

/// PDU types (PS3.8 section 9.3.1).
pub mod pdu_type {
    pub const ASSOCIATE_RQ: u8 = 0x01;
    pub const ASSOCIATE_AC: u8 = 0x02;
    pub const ASSOCIATE_RJ: u8 = 0x03;
    pub const P_DATA_TF: u8 = 0x04;
    pub const RELEASE_RQ: u8 = 0x05;
    pub const RELEASE_RP: u8 = 0x06;
    pub const ABORT: u8 = 0x07;
}

/// One presentation context proposed in an A-ASSOCIATE-RQ (PS3.8 section 9.3.2.2).
#[derive(Clone, Debug)]
pub struct ProposedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntaxes: Vec<String>,
}

/// An A-ASSOCIATE-RQ (PS3.8 section 9.3.2).
#[derive(Clone, Debug)]
pub struct AssociateRq {
    pub protocol_version: u16,
    pub called_ae: String,
    pub calling_ae: String,
    pub contexts: Vec<ProposedContext>,
    /// Maximum length received (PS3.8 D.1), announced in the user information item.
    pub max_pdu_length: u32,
}

impl AssociateRq {
    /// A request with one presentation context: Verification, implicit VR LE.
    pub fn verification(called_ae: &str, calling_ae: &str) -> AssociateRq {
        AssociateRq::new(called_ae, calling_ae, &[(VERIFICATION, &[IMPLICIT_VR_LE])])
    }

    /// A request with one presentation context per `(abstract syntax, transfer syntaxes)`,
    /// numbered 1, 3, 5, ...
    pub fn new(called_ae: &str, calling_ae: &str, contexts: &[(&str, &[&str])]) -> AssociateRq {
        AssociateRq {
            protocol_version: 1,
            called_ae: called_ae.to_owned(),
            calling_ae: calling_ae.to_owned(),
            contexts: contexts
                .iter()
                .enumerate()
                .map(|(i, (abs, tss))| ProposedContext {
                    id: u8::try_from(2 * i + 1).expect("too many contexts"),
                    abstract_syntax: (*abs).to_owned(),
                    transfer_syntaxes: tss.iter().map(|t| (*t).to_owned()).collect(),
                })
                .collect(),
            max_pdu_length: 16384,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&self.protocol_version.to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&ae_field(&self.called_ae));
        body.extend_from_slice(&ae_field(&self.calling_ae));
        body.extend_from_slice(&[0u8; 32]);
        item(&mut body, 0x10, APPLICATION_CONTEXT.as_bytes());
        for pc in &self.contexts {
            let mut v = vec![pc.id, 0, 0, 0];
            item(&mut v, 0x30, pc.abstract_syntax.as_bytes());
            for t in &pc.transfer_syntaxes {
                item(&mut v, 0x40, t.as_bytes());
            }
            item(&mut body, 0x20, &v);
        }
        let mut user = Vec::new();
        item(&mut user, 0x51, &self.max_pdu_length.to_be_bytes());
        item(&mut user, 0x52, IMPLEMENTATION_CLASS_UID.as_bytes());
        item(&mut user, 0x55, IMPLEMENTATION_VERSION_NAME.as_bytes());
        item(&mut body, 0x50, &user);
        pdu(pdu_type::ASSOCIATE_RQ, &body)
    }
}

/// A 16-byte AE title field, space padded (PS3.8 section 9.3.2).
fn ae_field(ae: &str) -> [u8; 16] {
    let mut f = [b' '; 16];
    let b = ae.as_bytes();
    f[..b.len().min(16)].copy_from_slice(&b[..b.len().min(16)]);
    f
}

/// An item or sub-item: type, reserved, 16-bit big-endian length, value (PS3.8 9.3.2.x).
fn item(out: &mut Vec<u8>, item_type: u8, value: &[u8]) {
    out.push(item_type);
    out.push(0);
    out.extend_from_slice(
        &u16::try_from(value.len())
            .expect("item too long")
            .to_be_bytes(),
    );
    out.extend_from_slice(value);
}

/// A whole PDU: type, reserved, 32-bit big-endian length, body (PS3.8 9.3.1).
pub fn pdu(pdu_type: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![pdu_type, 0];
    out.extend_from_slice(
        &u32::try_from(body.len())
            .expect("PDU too long")
            .to_be_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// A P-DATA-TF PDU carrying PDVs (PS3.8 9.3.5): each `(context id, message control header,
/// data)`; control bit 0 = command, bit 1 = last fragment (PS3.8 E.2).
pub fn p_data(pdvs: &[(u8, u8, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (id, control, data) in pdvs {
        body.extend_from_slice(
            &u32::try_from(data.len() + 2)
                .expect("PDV too long")
                .to_be_bytes(),
        );
        body.push(*id);
        body.push(*control);
        body.extend_from_slice(data);
    }
    pdu(pdu_type::P_DATA_TF, &body)
}

pub fn release_rq() -> Vec<u8> {
    pdu(pdu_type::RELEASE_RQ, &[0; 4])
}

/// An A-ABORT from the service user (source 0, reason 0).
pub fn abort() -> Vec<u8> {
    pdu(pdu_type::ABORT, &[0; 4])
}

/// A presentation context in an A-ASSOCIATE-AC (PS3.8 9.3.3.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedContext {
    pub id: u8,
    /// 0 acceptance, 1 user-rejection, 2 no-reason, 3 abstract syntax not supported,
    /// 4 transfer syntaxes not supported.
    pub result: u8,
    pub transfer_syntax: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdv {
    pub context_id: u8,
    pub control: u8,
    pub data: Vec<u8>,
}

impl Pdv {
    pub fn is_command(&self) -> bool {
        self.control & 1 != 0
    }
    pub fn is_last(&self) -> bool {
        self.control & 2 != 0
    }
}

/// A PDU received from the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pdu {
    AssociateAc {
        contexts: Vec<AcceptedContext>,
        max_pdu_length: Option<u32>,
    },
    /// PS3.8 9.3.4: result 1 permanent / 2 transient; source 1 service-user, 2 service-provider
    /// (ACSE), 3 service-provider (presentation); reason depends on the source.
    AssociateRj {
        result: u8,
        source: u8,
        reason: u8,
    },
    PData(Vec<Pdv>),
    ReleaseRq,
    ReleaseRp,
    /// PS3.8 9.3.8: source 0 service-user, 2 service-provider.
    Abort {
        source: u8,
        reason: u8,
    },
    Other {
        pdu_type: u8,
        body: Vec<u8>,
    },
}

fn parse_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches(['\0', ' '])
        .to_owned()
}

/// Walks the items of a variable field: `(type, value)`.
fn items(mut b: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
        let Some(value) = b.get(4..4 + len) else {
            break;
        };
        out.push((b[0], value));
        b = &b[4 + len..];
    }
    out
}

/// Parses a received PDU body by type; anything unexpected becomes [`Pdu::Other`].
pub fn parse_pdu(pdu_type: u8, body: Vec<u8>) -> Pdu {
    match pdu_type {
        pdu_type::ASSOCIATE_AC if body.len() >= 68 => {
            let mut contexts = Vec::new();
            let mut max_pdu_length = None;
            for (t, v) in items(&body[68..]) {
                match t {
                    0x21 if v.len() >= 4 => {
                        let ts = items(&v[4..])
                            .into_iter()
                            .find(|(t, _)| *t == 0x40)
                            .map(|(_, v)| parse_text(v))
                            .unwrap_or_default();
                        contexts.push(AcceptedContext {
                            id: v[0],
                            result: v[2],
                            transfer_syntax: ts,
                        });
                    }
                    0x50 => {
                        for (st, sv) in items(v) {
                            if st == 0x51 && sv.len() == 4 {
                                max_pdu_length =
                                    Some(u32::from_be_bytes([sv[0], sv[1], sv[2], sv[3]]));
                            }
                        }
                    }
                    _ => {}
                }
            }
            Pdu::AssociateAc {
                contexts,
                max_pdu_length,
            }
        }
        pdu_type::ASSOCIATE_RJ if body.len() == 4 => Pdu::AssociateRj {
            result: body[1],
            source: body[2],
            reason: body[3],
        },
        pdu_type::P_DATA_TF => {
            let mut pdvs = Vec::new();
            let mut b = &body[..];
            while b.len() >= 6 {
                let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
                if len < 2 || b.len() < 4 + len {
                    break;
                }
                pdvs.push(Pdv {
                    context_id: b[4],
                    control: b[5],
                    data: b[6..4 + len].to_vec(),
                });
                b = &b[4 + len..];
            }
            Pdu::PData(pdvs)
        }
        pdu_type::RELEASE_RQ => Pdu::ReleaseRq,
        pdu_type::RELEASE_RP => Pdu::ReleaseRp,
        pdu_type::ABORT if body.len() == 4 => Pdu::Abort {
            source: body[2],
            reason: body[3],
        },
        _ => Pdu::Other { pdu_type, body },
    }
}

/// A C-STORE-RQ command set (PS3.7 9.3.1.1).
pub fn store_command(message_id: u16, sop_class: &str, sop_instance: &str) -> Vec<u8> {
    CommandSet::new()
        .with_ui(0x0002, sop_class)
        .with_us(0x0100, 0x0001)
        .with_us(0x0110, message_id)
        .with_us(0x0700, 0x0000)
        .with_us(0x0800, 0x0000)
        .with_ui(0x1000, sop_instance)
        .encode()
}

/// A DIMSE command set: group 0000 elements in implicit VR little endian (PS3.7 6.3.1).
#[derive(Clone, Debug, Default)]
pub struct CommandSet {
    elements: BTreeMap<u16, Vec<u8>>,
}

impl CommandSet {
    pub fn new() -> CommandSet {
        CommandSet::default()
    }

    pub fn with_ui(mut self, elem: u16, uid: &str) -> CommandSet {
        let mut v = uid.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        self.elements.insert(elem, v);
        self
    }

    pub fn with_us(mut self, elem: u16, value: u16) -> CommandSet {
        self.elements.insert(elem, value.to_le_bytes().to_vec());
        self
    }

    /// Encodes with Command Group Length (0000,0000) first.
    pub fn encode(&self) -> Vec<u8> {
        let mut rest = Vec::new();
        for (e, v) in &self.elements {
            rest.extend_from_slice(&0u16.to_le_bytes());
            rest.extend_from_slice(&e.to_le_bytes());
            rest.extend_from_slice(&u32::try_from(v.len()).expect("len").to_le_bytes());
            rest.extend_from_slice(v);
        }
        let mut out = vec![0, 0, 0, 0, 4, 0, 0, 0];
        out.extend_from_slice(&u32::try_from(rest.len()).expect("len").to_le_bytes());
        out.extend_from_slice(&rest);
        out
    }

    pub fn parse(mut b: &[u8]) -> CommandSet {
        let mut elements = BTreeMap::new();
        while b.len() >= 8 {
            let g = u16::from_le_bytes([b[0], b[1]]);
            let e = u16::from_le_bytes([b[2], b[3]]);
            let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
            let Some(v) = b.get(8..8 + len) else { break };
            if g == 0 {
                elements.insert(e, v.to_vec());
            }
            b = &b[8 + len..];
        }
        CommandSet { elements }
    }

    pub fn us(&self, elem: u16) -> Option<u16> {
        self.elements
            .get(&elem)
            .filter(|v| v.len() == 2)
            .map(|v| u16::from_le_bytes([v[0], v[1]]))
    }

    pub fn text(&self, elem: u16) -> Option<String> {
        self.elements.get(&elem).map(|v| parse_text(v))
    }
}
