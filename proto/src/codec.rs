//! The APIs' codec: prost, with small initial buffers. A discovery stream stays open for
//! a proxy's whole life, and tonic's default 8 KiB buffer per direction of every stream
//! is held by the control plane for each connected proxy; the buffers still grow to fit
//! any message.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial bytes of each stream's encode and decode buffer. Requests (a CSR, a few
/// subscriptions) and most discovery answers fit.
const INITIAL_BUFFER: usize = 1024;
/// Past this many encoded bytes a stream hands them to the connection (tonic's default
/// is 32 KiB). Its encode buffer is kept, for the stream's life, as large as the most
/// it encoded between two hand-overs: a discovery stream queues many small answers at
/// once.
const YIELD_THRESHOLD: usize = 4 * 1024;

/// The codec the generated clients and servers use.
#[derive(Debug, Clone, Copy)]
pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
